//! `linattn run`: the safetensors contract, end to end through the binary, on the CPU backend.
//! Malformed input must give a one-line error naming the problem and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use linattn::cli::io::Inputs;
use linattn_reference::testing::{Rng, logsigmoid_gates};
use safetensors::{Dtype, tensor::TensorView};

/// A tensor to write: name, dtype, shape, f64 values (converted to the dtype on write).
struct Spec<'a>(&'a str, Dtype, Vec<usize>, Vec<f64>);

fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect(),
        Dtype::F64 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f64(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
            .collect(),
        Dtype::I64 => values
            .iter()
            .flat_map(|&x| (x as i64).to_le_bytes())
            .collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|&x| (x as i32).to_le_bytes())
            .collect(),
        Dtype::U8 => values.iter().map(|&x| x as u8).collect(),
        other => panic!("test helper does not encode {other:?}"),
    }
}

fn write_inputs(path: &Path, tensors: &[Spec]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|Spec(_, dt, _, v)| encode(*dt, v))
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(Spec(name, dt, shape, _), b)| {
            (
                name.to_string(),
                TensorView::new(*dt, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

struct Run {
    ok: bool,
    stderr: String,
}

fn linattn(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(args)
        .output()
        .expect("binary runs");
    Run {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// q, k, v, g of a small GLA problem in `dtype`.
fn gla_inputs(
    rng: &mut Rng,
    dtype: Dtype,
    (b, t, h, k, v): (usize, usize, usize, usize, usize),
) -> Vec<Spec<'static>> {
    vec![
        Spec("q", dtype, vec![b, t, h, k], rng.randn(b * t * h * k)),
        Spec("k", dtype, vec![b, t, h, k], rng.randn(b * t * h * k)),
        Spec("v", dtype, vec![b, t, h, v], rng.randn(b * t * h * v)),
        Spec(
            "g",
            dtype,
            vec![b, t, h, k],
            logsigmoid_gates(rng, b * t * h * k, 1.0),
        ),
    ]
}

fn assert_one_line_error(run: &Run, needle: &str) {
    assert!(!run.ok, "expected failure, stderr: {}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "panic: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {:?}", run.stderr);
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "error should mention `{needle}`: {}",
        lines[0]
    );
}

#[test]
fn gla_forward_and_backward_write_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(1);
    let shape = (1, 9, 2, 4, 3);
    let mut tensors = gla_inputs(&mut rng, Dtype::BF16, shape);
    tensors.push(Spec("h0", Dtype::F32, vec![1, 2, 4, 3], rng.randn(24)));
    tensors.push(Spec("do", Dtype::F16, vec![1, 9, 2, 3], rng.randn(54)));
    tensors.push(Spec("dht", Dtype::F64, vec![1, 2, 4, 3], rng.randn(24)));
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "gla",
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let out = Inputs::read(Some(&output)).unwrap();
    let expect = [
        ("o", vec![1, 9, 2, 3]),
        ("ht", vec![1, 2, 4, 3]),
        ("dq", vec![1, 9, 2, 4]),
        ("dk", vec![1, 9, 2, 4]),
        ("dv", vec![1, 9, 2, 3]),
        ("dg", vec![1, 9, 2, 4]),
        ("dh0", vec![1, 2, 4, 3]),
    ];
    for (name, shape) in &expect {
        let t = out.float(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), linattn::DType::F32, "{name}: outputs are f32");
        assert!(t.first_non_finite().is_none(), "{name}");
    }
    assert_eq!(out.names().len(), expect.len());
}

#[test]
fn gla_output_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(2);
    let (b, t, h, k, v) = (2, 7, 1, 3, 2);
    let tensors = gla_inputs(&mut rng, Dtype::F64, (b, t, h, k, v));
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "gla",
        "--device",
        "cpu",
        "--form",
        "recurrent",
        "--scale",
        "0.5",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let o = Inputs::read(Some(&output))
        .unwrap()
        .float("o")
        .unwrap()
        .to_f64_vec();
    // o_t = scale * q_t S_t, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, written out directly.
    let [q, kk, vv, g] = [0, 1, 2, 3].map(|i| &tensors[i].3);
    let mut want = vec![0.0; b * t * h * v];
    for bb in 0..b {
        let mut s = vec![0.0; k * v];
        for tt in 0..t {
            let base = bb * t + tt;
            for i in 0..k {
                for j in 0..v {
                    s[i * v + j] =
                        s[i * v + j] * g[base * k + i].exp() + kk[base * k + i] * vv[base * v + j];
                }
            }
            for j in 0..v {
                want[base * v + j] =
                    0.5 * (0..k).map(|i| q[base * k + i] * s[i * v + j]).sum::<f64>();
            }
        }
    }
    for (a, w) in o.iter().zip(&want) {
        // outputs are written as f32
        assert!((a - w).abs() <= 1e-6 * (1.0 + w.abs()), "{a} vs {w}");
    }
}

#[test]
fn lion_without_gate_and_with_per_head_gates() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(3);
    let (b, t, h, k, v) = (1, 6, 2, 4, 4);
    let mut tensors = vec![
        Spec(
            "q",
            Dtype::F32,
            vec![b, t, h, k],
            rng.uniform_vec(b * t * h * k, 0.1, 1.0),
        ),
        Spec(
            "k",
            Dtype::F32,
            vec![b, t, h, k],
            rng.uniform_vec(b * t * h * k, 0.1, 1.0),
        ),
        Spec("v", Dtype::F32, vec![b, t, h, v], rng.randn(b * t * h * v)),
        Spec("do", Dtype::F32, vec![b, t, h, v], rng.randn(b * t * h * v)),
    ];
    write_inputs(&input, &tensors);
    let args = |input: &Path, output: &Path| {
        vec![
            "run".to_string(),
            "lion".into(),
            "--device".into(),
            "cpu".into(),
            "--normalize".into(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            output.display().to_string(),
        ]
    };
    let a = args(&input, &output);
    let run = linattn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run.ok, "{}", run.stderr);
    let out = Inputs::read(Some(&output)).unwrap();
    // No gate: no dg. Names come back sorted.
    assert_eq!(out.names(), vec!["dk", "dq", "dv", "o"]);

    tensors.push(Spec("g", Dtype::F32, vec![h], vec![-0.1, -0.5]));
    tensors.push(Spec("g_bwd", Dtype::F32, vec![h], vec![-0.2, -0.3]));
    write_inputs(&input, &tensors);
    let run = linattn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run.ok, "{}", run.stderr);
    let out = Inputs::read(Some(&output)).unwrap();
    assert_eq!(out.float("dg").unwrap().shape(), &[h]);
    assert_eq!(out.float("dg_bwd").unwrap().shape(), &[h]);
}

#[test]
fn malformed_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(4);
    let shape = (1, 8, 2, 4, 4);
    let run_gla = |tensors: &[Spec]| {
        write_inputs(&input, tensors);
        linattn(&[
            "run",
            "gla",
            "--device",
            "cpu",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ])
    };

    // missing tensor
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t.remove(3);
    assert_one_line_error(&run_gla(&t), "missing tensor `g`");

    // wrong shape, naming the tensor and both shapes
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t[2] = Spec("v", Dtype::F32, vec![1, 7, 2, 4], rng.randn(56));
    assert_one_line_error(&run_gla(&t), "`v`");
    assert_one_line_error(&run_gla(&t), "[1, 7, 2, 4]");

    // positive gate
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t[3].3[5] = 0.25;
    assert_one_line_error(&run_gla(&t), "invalid gate `g`: element 5 is 0.25");

    // NaN input
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t[0].3[3] = f64::NAN;
    assert_one_line_error(&run_gla(&t), "non-finite input `q`");

    // bad cu_seqlens (B must be 1, offsets must end at T)
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t.push(Spec("cu_seqlens", Dtype::I64, vec![3], vec![0.0, 3.0, 7.0]));
    assert_one_line_error(&run_gla(&t), "bad cu_seqlens");
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t.push(Spec("cu_seqlens", Dtype::I32, vec![2], vec![0.0, 0.0]));
    assert_one_line_error(&run_gla(&t), "bad cu_seqlens");

    // h0 of the wrong shape
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t.push(Spec("h0", Dtype::F32, vec![1, 2, 4], rng.randn(8)));
    assert_one_line_error(&run_gla(&t), "`h0`");

    // integer tensor where a float is expected
    let mut t = gla_inputs(&mut rng, Dtype::F32, shape);
    t[0] = Spec("q", Dtype::I32, vec![1, 8, 2, 4], vec![1.0; 64]);
    assert_one_line_error(&run_gla(&t), "`q` must be a float tensor");

    // not a safetensors file at all
    std::fs::write(&input, b"definitely not safetensors").unwrap();
    let run = linattn(&[
        "run",
        "gla",
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "safetensors");

    // unknown device and form
    let t = gla_inputs(&mut rng, Dtype::F32, shape);
    write_inputs(&input, &t);
    let run = linattn(&[
        "run",
        "gla",
        "--device",
        "tpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "unknown device `tpu`");
    let run = linattn(&[
        "run",
        "gla",
        "--device",
        "cpu",
        "--form",
        "magic",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "unknown form `magic`");
}

#[test]
fn attention_with_block_mask_and_an_empty_row() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(5);
    let (b, t, s, h, d) = (1, 100, 70, 2, 16); // blocks of 32 tokens
    // 4 x 3 blocks; query block 2 (tokens 64..96) sees nothing.
    let mask = vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let mut tensors = vec![
        Spec("q", Dtype::F32, vec![b, t, h, d], rng.randn(b * t * h * d)),
        Spec("k", Dtype::F32, vec![b, s, h, d], rng.randn(b * s * h * d)),
        Spec("v", Dtype::F32, vec![b, s, h, d], rng.randn(b * s * h * d)),
        Spec("block_mask", Dtype::U8, vec![4, 3], mask),
        Spec("do", Dtype::F32, vec![b, t, h, d], rng.randn(b * t * h * d)),
    ];
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "attention",
        "--device",
        "cpu",
        "--block-size",
        "32",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let out = Inputs::read(Some(&output)).unwrap();
    assert_eq!(out.names(), vec!["dk", "dq", "dv", "lse", "o"]);
    let lse = out.float("lse").unwrap();
    assert_eq!(lse.shape(), &[b, h, t]);
    let lse = lse.to_f64_vec();
    for hh in 0..h {
        for i in 0..t {
            let x = lse[hh * t + i];
            if (64..96).contains(&i) {
                assert_eq!(x, f64::NEG_INFINITY, "empty row {i}");
            } else {
                assert!(x.is_finite(), "row {i}");
            }
        }
    }
    let o = out.float("o").unwrap().to_f64_vec();
    let dq = out.float("dq").unwrap().to_f64_vec();
    for i in 64..96 {
        for hh in 0..h {
            let at = (i * h + hh) * d;
            assert!(
                o[at..at + d].iter().all(|&x| x == 0.0),
                "o of an empty row is 0"
            );
            assert!(
                dq[at..at + d].iter().all(|&x| x == 0.0),
                "dq of an empty row is 0"
            );
        }
    }

    // q, k, v must share one dtype (the kernels read them with one element type).
    tensors[1].1 = Dtype::BF16;
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "attention",
        "--device",
        "cpu",
        "--block-size",
        "32",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "`k` is bf16 but `q` is f32");
    tensors[1].1 = Dtype::F32;

    // A mask on the wrong grid names the tensor and the expected grid.
    tensors[3] = Spec("block_mask", Dtype::U8, vec![4, 4], vec![1.0; 16]);
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "attention",
        "--device",
        "cpu",
        "--block-size",
        "32",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "`block_mask`");
    // A mask value other than 0/1.
    tensors[3] = Spec("block_mask", Dtype::U8, vec![4, 3], vec![2.0; 12]);
    write_inputs(&input, &tensors);
    let run = linattn(&[
        "run",
        "attention",
        "--device",
        "cpu",
        "--block-size",
        "32",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "block_mask element 0 is 2");
}

#[test]
fn radial_mask_needs_no_input_and_matches_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let output = tmp(&dir, "mask.safetensors");
    for model in ["wan", "hunyuan", "paper"] {
        let run = linattn(&[
            "run",
            "radial-mask",
            "--frames",
            "8",
            "--tokens-per-frame",
            "256",
            "--block-size",
            "64",
            "--model",
            model,
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(run.ok, "{}", run.stderr);
        let out = Inputs::read(Some(&output)).unwrap();
        let mask = out.opt_int("block_mask").unwrap().expect("u8 block_mask");
        assert_eq!(mask.shape, vec![32, 32]);
        let want = linattn::attention::radial_mask(&linattn::attention::RadialConfig {
            frames: 8,
            tokens_per_frame: 256,
            block_size: 64,
            decay_factor: 1.0,
            model: match model {
                "wan" => linattn::attention::RadialModel::Wan,
                "hunyuan" => linattn::attention::RadialModel::Hunyuan,
                _ => linattn::attention::RadialModel::Paper,
            },
            text_tokens: 0,
        })
        .unwrap();
        let got: Vec<u8> = mask.data.iter().map(|&x| x as u8).collect();
        assert_eq!(got, want.to_dense(), "{model}");
    }
    let run = linattn(&[
        "run",
        "radial-mask",
        "--frames",
        "8",
        "--tokens-per-frame",
        "256",
        "--model",
        "sora",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "unknown radial model `sora`");
    let run = linattn(&[
        "run",
        "radial-mask",
        "--frames",
        "0",
        "--tokens-per-frame",
        "256",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "frames must be >= 1");
}

// ------------------------------------------------------- contract fixes (issues 13 and 14)

fn run_op(op: &str, input: &Path, output: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "run",
        op,
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    linattn(&args)
}

/// A safetensors file written byte by byte: `header` is the JSON header as given (so that it can
/// hold what the serializer would never write), `data` the data section.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn radial_wan_mask_follows_the_released_rule_at_frame_distance_one() {
    // The report's configuration: the old s // 2 window at d = 1 gave 722 blocks, 26 fewer than
    // the released code's latest rule (d <= 1 full).
    let dir = tempfile::tempdir().unwrap();
    let output = tmp(&dir, "mask.safetensors");
    let run = linattn(&[
        "run",
        "radial-mask",
        "--frames",
        "8",
        "--tokens-per-frame",
        "256",
        "--block-size",
        "64",
        "--decay-factor",
        "0.2",
        "--model",
        "wan",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let out = Inputs::read(Some(&output)).unwrap();
    let mask = out.opt_int("block_mask").unwrap().unwrap();
    assert_eq!(mask.data.iter().filter(|&&x| x != 0).count(), 748);
}

#[test]
fn ops_without_inputs_accept_and_ignore_input_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let (unused, output) = (
        tmp(&dir, "unused.safetensors"),
        tmp(&dir, "out.safetensors"),
    );
    std::fs::write(&unused, b"not read").unwrap();
    let run = run_op(
        "schedule",
        &unused,
        &output,
        &["--kind", "cosine", "--total", "10", "--warmup", "2"],
    );
    assert!(run.ok, "{}", run.stderr);
    let lr = Inputs::read(Some(&output)).unwrap();
    assert_eq!(lr.float("lr").unwrap().shape(), &[10]);
    let run = run_op(
        "radial-mask",
        &unused,
        &output,
        &["--frames", "2", "--tokens-per-frame", "128"],
    );
    assert!(run.ok, "{}", run.stderr);
    // --device is still checked for its spelling
    let run = linattn(&[
        "run",
        "schedule",
        "--device",
        "tpu",
        "--kind",
        "constant",
        "--total",
        "3",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "unknown device `tpu`");
}

#[test]
fn output_equal_to_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let input = tmp(&dir, "in.safetensors");
    let mut rng = Rng::new(21);
    write_inputs(&input, &gla_inputs(&mut rng, Dtype::F32, (1, 4, 1, 2, 2)));
    let before = std::fs::read(&input).unwrap();
    // the same file, and the same file through another spelling of its path
    let other_spelling = dir.path().join(".").join("in.safetensors");
    for output in [input.clone(), other_spelling] {
        let run = run_op("gla", &input, &output, &[]);
        assert_one_line_error(&run, "is the input file");
        assert_eq!(std::fs::read(&input).unwrap(), before);
    }
}

#[test]
fn outputs_are_written_through_a_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(22);
    write_inputs(&input, &gla_inputs(&mut rng, Dtype::F32, (1, 4, 1, 2, 2)));
    std::fs::write(&output, b"an older result").unwrap();
    let run = run_op("gla", &input, &output, &[]);
    assert!(run.ok, "{}", run.stderr);
    assert!(Inputs::read(Some(&output)).unwrap().float("o").is_ok());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left behind: {names:?}");
    // A failing run leaves the previous output as it was.
    let good = std::fs::read(&output).unwrap();
    let mut t = gla_inputs(&mut rng, Dtype::F32, (1, 4, 1, 2, 2));
    t[3].3[0] = 1.0; // a positive gate
    write_inputs(&input, &t);
    assert_one_line_error(&run_op("gla", &input, &output, &[]), "invalid gate");
    assert_eq!(std::fs::read(&output).unwrap(), good);
}

#[test]
fn sizes_from_flags_are_bounded_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let output = tmp(&dir, "out.safetensors");
    let started = std::time::Instant::now();
    for (frames, tokens, needle) in [
        ("50000000", "50000000", "the limit is 268435456 blocks"),
        ("100000", "1", "the limit is 2147483648"),
        ("18446744073709551615", "18446744073709551615", "limit"),
    ] {
        for model in ["wan", "paper"] {
            let run = linattn(&[
                "run",
                "radial-mask",
                "--frames",
                frames,
                "--tokens-per-frame",
                tokens,
                "--model",
                model,
                "--output",
                output.to_str().unwrap(),
            ]);
            assert_one_line_error(&run, needle);
        }
    }
    let run = linattn(&[
        "run",
        "schedule",
        "--kind",
        "cosine",
        "--total",
        "100000000000",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "the limit is 67108864 steps");
    assert!(
        started.elapsed().as_secs() < 20,
        "refusals must not do the work first"
    );
    assert!(!output.exists());
}

#[test]
fn tensors_an_op_does_not_read_are_refused_with_the_nearest_name() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(23);
    let shape = (1, 4, 1, 2, 2);
    let with = |rng: &mut Rng, extra: Spec<'static>| {
        let mut t = gla_inputs(rng, Dtype::F32, shape);
        t.push(extra);
        t
    };
    write_inputs(
        &input,
        &with(
            &mut rng,
            Spec("cu_seqlen", Dtype::I64, vec![2], vec![0.0, 4.0]),
        ),
    );
    let run = run_op("gla", &input, &output, &[]);
    assert_one_line_error(&run, "`gla` does not read the input tensor `cu_seqlen`");
    assert_one_line_error(&run, "did you mean `cu_seqlens`?");
    write_inputs(
        &input,
        &with(
            &mut rng,
            Spec("h00", Dtype::F32, vec![1, 1, 2, 2], vec![0.5; 4]),
        ),
    );
    assert_one_line_error(&run_op("gla", &input, &output, &[]), "did you mean `h0`?");
    // lion and lightnet have no h0; attention no cu_seqlens
    let h0 = Spec("h0", Dtype::F32, vec![1, 1, 2, 2], vec![0.0; 4]);
    let mut t = with(&mut rng, h0);
    t.remove(3); // g [B,T,H,K] is no lion gate
    write_inputs(&input, &t);
    assert_one_line_error(
        &run_op("lion", &input, &output, &[]),
        "`lion` does not read the input tensor `h0`",
    );
    assert_one_line_error(
        &run_op("lightnet", &input, &output, &[]),
        "`lightnet` does not read the input tensor `h0`",
    );
    let mut t = with(
        &mut rng,
        Spec("cu_seqlens", Dtype::I64, vec![2], vec![0.0, 4.0]),
    );
    t.remove(3);
    write_inputs(&input, &t);
    assert_one_line_error(
        &run_op("attention", &input, &output, &[]),
        "`attention` does not read the input tensor `cu_seqlens`",
    );
    assert!(!output.exists());
}

#[test]
fn schedule_totals_of_zero_or_below_the_steps_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(24);
    write_inputs(
        &input,
        &[
            Spec("param", Dtype::F32, vec![3], rng.randn(3)),
            Spec("grads", Dtype::F32, vec![5, 3], rng.randn(15)),
        ],
    );
    for kind in ["cosine", "linear"] {
        let run = run_op(
            "optimize",
            &input,
            &output,
            &["--lr", "1e-3", "--total", "0", "--schedule", kind],
        );
        assert_one_line_error(&run, "needs --total >= 1, got 0");
        let run = run_op(
            "optimize",
            &input,
            &output,
            &["--lr", "1e-3", "--total", "3", "--schedule", kind],
        );
        assert_one_line_error(&run, "--total 3 is smaller than the 5 steps run");
    }
    let run = run_op(
        "optimize",
        &input,
        &output,
        &["--lr", "1e-3", "--total", "5", "--schedule", "cosine"],
    );
    assert!(run.ok, "{}", run.stderr);
    let run = linattn(&[
        "run",
        "schedule",
        "--kind",
        "linear",
        "--total",
        "0",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_one_line_error(&run, "--total >= 1, got 0");
}

#[test]
fn malformed_headers_name_the_tensor_and_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let gla = |header: &str, data: &[u8]| {
        raw_safetensors(&input, header, data);
        run_op("gla", &input, &output, &[])
    };
    // a duplicated name, different shapes, same offsets: refused, not last-one-wins
    let run = gla(
        r#"{"g":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"g":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        &[0; 16],
    );
    assert_one_line_error(&run, "tensor `g` appears twice in the header");
    // the same, every time (no hash-map order): the duplicated tensor is named, not a neighbour
    for _ in 0..3 {
        let run = gla(
            r#"{"k":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"q":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"q":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[0; 12],
        );
        assert_one_line_error(&run, "tensor `q` appears twice");
    }
    // a shape that needs more bytes than the offsets give
    let run = gla(
        r#"{"q":{"dtype":"F32","shape":[1,1000000000,64,64],"data_offsets":[0,16]}}"#,
        &[0; 16],
    );
    assert_one_line_error(
        &run,
        "tensor `q` (F32, shape [1, 1000000000, 64, 64]) needs 16384000000000 bytes, but its data_offsets [0, 16] give 16",
    );
    // an offset past the end of the data
    let run = gla(
        r#"{"v":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"k":{"dtype":"F16","shape":[4],"data_offsets":[8,16]}}"#,
        &[0; 12],
    );
    assert_one_line_error(
        &run,
        "tensor `k` (F16, shape [4]): data_offsets [8, 16] run past the data section (12 bytes)",
    );
    // overlapping tensors
    let run = gla(
        r#"{"q":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"k":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    );
    assert_one_line_error(
        &run,
        "tensor `k` (data_offsets [4, 12]) overlaps tensor `q`",
    );
    // an unsupported dtype names the tensor
    let run = gla(
        r#"{"q":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_one_line_error(&run, "tensor `q` has dtype C64");
}

#[test]
fn outputs_that_overflow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(25);
    let mut t = gla_inputs(&mut rng, Dtype::F32, (1, 6, 2, 4, 4));
    for x in t[0].3.iter_mut() {
        *x = 1e38; // finite in f32; q k v and the sums overflow it
    }
    for x in t[1].3.iter_mut() {
        *x = 1e38;
    }
    write_inputs(&input, &t);
    let run = run_op("gla", &input, &output, &[]);
    assert_one_line_error(&run, "output `o` has 48 non-finite values of 48");
    assert!(!output.exists());
}

#[test]
fn chunk_size_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (tmp(&dir, "in.safetensors"), tmp(&dir, "out.safetensors"));
    let mut rng = Rng::new(26);
    write_inputs(&input, &gla_inputs(&mut rng, Dtype::F32, (1, 4, 1, 2, 2)));
    for bad in ["-1", "0", "x"] {
        let run = run_op("gla", &input, &output, &["--chunk-size", bad]);
        assert!(!run.ok);
        assert!(
            run.stderr.contains("the chunk size must be"),
            "{bad}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("unexpected argument"),
            "{}",
            run.stderr
        );
    }
}

/// `linattn devices` says which backends run here and why the others do not, and a cube start
/// on a headless machine (no XDG_RUNTIME_DIR) prints no driver noise.
#[test]
fn devices_lists_every_backend_without_driver_noise() {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .arg("devices")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .expect("binary runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, kind) in lines.iter().zip(["cuda: ", "cube: ", "cpu: available"]) {
        assert!(line.starts_with(kind), "{line}");
        assert!(
            line.contains("available") || line.contains("skipped: "),
            "{line}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "driver noise on stderr: {stderr}");
}
