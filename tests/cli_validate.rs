//! `linattn validate --quick --device cpu`: the README's main command prints a row for every op and
//! form and exits 0.

use std::process::Command;

#[test]
fn quick_validate_on_cpu_covers_every_op_and_form() {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(["validate", "--quick", "--device", "cpu", "--seed", "7"])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("seed 7"), "the seed is printed");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("| cpu ")).collect();
    for op in [
        "gla",
        "retnet",
        "mamba2",
        "linear",
        "gla-varlen",
        "lion-lit",
        "lion-d",
        "lion-s",
    ] {
        for form in ["recurrent", "parallel", "chunkwise"] {
            assert!(
                rows.iter()
                    .any(|r| r.starts_with(&format!("| {op} ")) && r.contains(form)),
                "missing row {op} / {form}:\n{stdout}"
            );
        }
    }
    for op in [
        "attention-dense",
        "attention-causal",
        "attention-sparse",
        "attention-radial-wan",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {op} "))),
            "missing {op}"
        );
    }
    assert!(rows.iter().all(|r| r.contains("| pass")), "{stdout}");
}

#[test]
fn validate_rejects_an_unknown_device() {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(["validate", "--device", "fpga"])
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown device `fpga`"), "{stderr}");
}

/// `--ops` keeps the ops whose name starts with one of its entries; `--full` on a backend without
/// GPU suites says so and still validates; `--quick` and `--full` exclude each other.
#[test]
fn ops_filter_and_full_without_gpu_suites() {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args([
            "validate",
            "--full",
            "--device",
            "cpu",
            "--ops",
            "lion-s,adamw",
        ])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("| cpu ")).collect();
    assert!(!rows.is_empty(), "{stdout}");
    assert!(
        rows.iter()
            .all(|r| r.starts_with("| lion-s ") || r.starts_with("| adamw")),
        "{stdout}"
    );
    assert!(rows.iter().any(|r| r.starts_with("| adamw ")), "{stdout}");
    assert!(
        stdout.contains("suites: the GPU test suites run on the cuda backend only"),
        "{stdout}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(["validate", "--quick", "--full", "--device", "cpu"])
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
