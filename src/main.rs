fn main() -> std::process::ExitCode {
    linattn::cli::main()
}
