//! `linattn run gla|lion|lightnet --device cube` end to end (safetensors in, safetensors out),
//! against the same command on the CPU reference.
//!
//! Prints `skipped: no wgpu adapter` and passes when there is none (fails instead when
//! `LINATTN_REQUIRE_WGPU` is set, as in CI).

use clap::Parser;
use linattn::cli::io::{Inputs, Outputs};
use linattn::cli::{Cli, execute};
use linattn::cube::CubeContext;
use linattn::reference::testing::{Rng, logsigmoid_gates};
use linattn::reference::within_tolerance;
use linattn::{DType, Tensor};

fn f32t(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
    Tensor::from_f64(shape, data).unwrap().to_dtype(DType::F32)
}

/// Runs `linattn run <op> ...` with `extra` flags on `inputs` for the cpu and cube devices and
/// compares every output tensor.
fn run_both(op: &str, extra: &[&str], inputs: Outputs, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    inputs.write(&input).unwrap();
    let mut results = Vec::new();
    for device in ["cpu", "cube"] {
        let output = dir.path().join(format!("{device}.safetensors"));
        let mut args = vec![
            "linattn".to_string(),
            "run".into(),
            op.into(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            output.display().to_string(),
            "--device".into(),
            device.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let cli = Cli::try_parse_from(&args).unwrap();
        let code = execute(cli).unwrap_or_else(|e| panic!("{op} on {device}: {e}"));
        assert_eq!(
            format!("{code:?}"),
            format!("{:?}", std::process::ExitCode::SUCCESS)
        );
        results.push(Inputs::read(Some(&output)).unwrap());
    }
    for name in expected {
        let cpu = results[0].float(name).unwrap().to_f64_vec();
        let cube = results[1].float(name).unwrap().to_f64_vec();
        assert!(
            within_tolerance(&cube, &cpu, 1e-5),
            "{op} {extra:?}: `{name}` differs"
        );
    }
}

#[test]
fn run_ops_on_cube_match_cpu() {
    if let Err(e) = CubeContext::shared() {
        assert!(
            std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
            "LINATTN_REQUIRE_WGPU is set but there is no wgpu adapter: {e}"
        );
        println!("skipped: no wgpu adapter ({e})");
        return;
    }
    let (b, t, h, k, v) = (1, 50, 2, 16, 12);
    let mut rng = Rng::new(3);
    let draw = |rng: &mut Rng| {
        let mut out = Outputs::default();
        out.float("q", f32t(vec![b, t, h, k], rng.randn(b * t * h * k)));
        out.float("k", f32t(vec![b, t, h, k], rng.randn(b * t * h * k)));
        out.float("v", f32t(vec![b, t, h, v], rng.randn(b * t * h * v)));
        out.float("do", f32t(vec![b, t, h, v], rng.randn(b * t * h * v)));
        out
    };

    let mut gla = draw(&mut rng);
    gla.float(
        "g",
        f32t(
            vec![b, t, h, k],
            logsigmoid_gates(&mut rng, b * t * h * k, 1.0),
        ),
    );
    run_both(
        "gla",
        &["--form", "chunkwise", "--chunk-size", "16"],
        gla,
        &["o", "ht", "dq", "dk", "dv", "dg"],
    );

    let mut lion = draw(&mut rng);
    lion.float(
        "g",
        f32t(vec![b, t, h], logsigmoid_gates(&mut rng, b * t * h, 1.0)),
    );
    run_both(
        "lion",
        &["--form", "recurrent"],
        lion,
        &["o", "dq", "dk", "dv", "dg"],
    );

    let causal = draw(&mut rng);
    run_both(
        "lightnet",
        &["--form", "chunkwise"],
        causal,
        &["o", "s", "z", "dq", "dk", "dv"],
    );
    let non_causal = draw(&mut rng);
    run_both(
        "lightnet",
        &["--bidirectional", "--form", "parallel"],
        non_causal,
        &["o", "dq", "dk", "dv"],
    );
}
