//! `linattn bench engine|attention|optim`: the JSON the peer scripts read (on the cube backend,
//! tiny shapes), and the errors of bad flags and missing devices (never a panic). The GPU run
//! (`scripts/gpu-run.sh`) uses the same commands on `--device cuda`.
//!
//! The cube cases print `skipped: no wgpu adapter` and pass when there is none (they fail instead
//! when `LINATTN_REQUIRE_WGPU` is set, as in CI).

#![cfg(all(feature = "cube", feature = "cuda"))]

use clap::Parser;
use linattn::cli::{Cli, execute};
use linattn::cube::CubeContext;

fn run(args: &[&str]) -> linattn::Result<std::process::ExitCode> {
    let mut argv = vec!["linattn", "bench"];
    argv.extend_from_slice(args);
    execute(Cli::try_parse_from(&argv).expect("flags parse"))
}

fn cube_available() -> bool {
    match CubeContext::shared() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
                "LINATTN_REQUIRE_WGPU is set but there is no wgpu adapter: {e}"
            );
            println!("skipped: no wgpu adapter ({e})");
            false
        }
    }
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    x
}

#[test]
fn benchmarks_on_cube_write_the_peer_scripts_json() {
    if !cube_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = dir.path().join("engine.json");
    run(&[
        "engine",
        "--device",
        "cube",
        "--dtype",
        "f32",
        "--shapes",
        "B1-T40-H1-D16",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--json",
        engine.to_str().unwrap(),
    ])
    .unwrap();
    let doc = read_json(&engine);
    assert_eq!(doc["backend"], "cube");
    assert_eq!(doc["dtype"], "f32");
    let r = &doc["results"][0];
    assert_eq!(r["shape"], "B1-T40-H1-D16");
    positive(r, "fwd_ms");
    positive(r, "fwdbwd_ms");
    positive(r, "fwdbwd_tflops");

    let attention = dir.path().join("attention.json");
    run(&[
        "attention",
        "--device",
        "cube",
        "--dtype",
        "f32",
        "--seqs",
        "256",
        "--tokens-per-frame",
        "64",
        "--heads",
        "1",
        "--head-dim",
        "16",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
        attention.to_str().unwrap(),
    ])
    .unwrap();
    let doc = read_json(&attention);
    let results = doc["results"].as_array().unwrap();
    // dense and sparse, forward and backward
    assert_eq!(results.len(), 4, "{doc}");
    for r in results {
        positive(r, "ms");
        let density = positive(r, "density");
        assert!(density <= 1.0);
        assert_eq!(r["seq"], 256);
    }

    let optim = dir.path().join("optim.json");
    run(&[
        "optim",
        "--device",
        "cube",
        "--params",
        "5000",
        "--tensors",
        "7",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
        optim.to_str().unwrap(),
    ])
    .unwrap();
    let doc = read_json(&optim);
    assert_eq!(doc["params_requested"], 5000);
    assert_eq!(doc["tensors"], 7);
    for r in doc["results"].as_array().unwrap() {
        positive(r, "ms");
        positive(r, "gb_s");
        positive(r, "copy_ms");
    }
}

#[test]
fn bad_flags_and_missing_devices_are_errors() {
    let err = |args: &[&str]| run(args).expect_err(&format!("{args:?} should fail"));
    assert!(matches!(
        err(&["engine", "--device", "tpu"]),
        linattn::Error::InvalidArgument(_)
    ));
    assert!(matches!(
        err(&["engine", "--iters", "0"]),
        linattn::Error::InvalidArgument(_)
    ));
    assert!(matches!(
        err(&["engine", "--shapes", "B1-T8"]),
        linattn::Error::InvalidArgument(_)
    ));
    let e = err(&["attention", "--device", "cube", "--seqs", "1000"]);
    assert!(e.to_string().contains("1000"), "{e}");
    assert!(matches!(
        err(&["optim", "--params", "3", "--tensors", "5"]),
        linattn::Error::InvalidArgument(_)
    ));
    // Without a GPU the cuda benchmarks say why, as an error.
    if linattn::cuda::CudaContext::shared().is_err() {
        let e = err(&["engine"]);
        assert!(matches!(e, linattn::Error::DeviceUnavailable { .. }), "{e}");
    }
}
