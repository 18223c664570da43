//! The stateful `optim::Optimizer`, one API on every backend: stepping it call by call equals
//! `optim::optimize` (all gradients up front) on the same backend; device-resident gradients give
//! the same steps as host ones; a state saved to safetensors and loaded into a fresh optimizer
//! continues the run bit for bit (and moves between backends); bad gradients and files are typed
//! errors. Cube tests run on llvmpipe in CI; without a wgpu adapter they print `skipped: ...`.

use linattn::backend::Backend;
use linattn::optim::{
    self, CopyFormat, Optimizer, OptimizerConfig, Params, Rounding, Schedule, Shape,
};
use linattn::suites::adapter_optimizer_configs;
use linattn::tensor::{DType, Tensor};
use linattn_reference::testing::Rng;

const SHAPES: [&[usize]; 4] = [&[3, 5], &[7], &[0], &[33, 2]];
const CALLS: usize = 20;

fn schedule() -> Schedule {
    Schedule::Wsd {
        warmup: 3,
        stable: CALLS - 9,
        decay: 6,
        min_ratio: 0.1,
        warmup_shape: Shape::Linear,
        decay_shape: Shape::OneMinusSqrt,
    }
}

fn tensors(rng: &mut Rng, scale: f64) -> Vec<Tensor> {
    SHAPES
        .iter()
        .map(|s| {
            let n = s.iter().product();
            let v: Vec<f32> = rng.randn(n).iter().map(|x| (x * scale) as f32).collect();
            Tensor::from_f32(s.to_vec(), v).unwrap()
        })
        .collect()
}

/// Parameters and `CALLS` gradients (call 9 has a NaN: a skipped call in every run).
fn problem(seed: u64) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let mut rng = Rng::new(seed);
    let params = tensors(&mut rng, 1.0);
    let grads = (0..CALLS)
        .map(|k| {
            let mut g = tensors(&mut rng, 0.5);
            if k == 9 {
                let mut v = g[0].to_f32_vec();
                v[4] = f32::NAN;
                g[0] = Tensor::from_f32(SHAPES[0].to_vec(), v).unwrap();
            }
            g
        })
        .collect();
    (params, grads)
}

fn configs() -> Vec<(String, OptimizerConfig)> {
    let mut out: Vec<(String, OptimizerConfig)> = adapter_optimizer_configs()
        .into_iter()
        .map(|(name, c)| (format!("{} {name}", method(&c)), c))
        .collect();
    out.push((
        "adamw ema + stochastic bf16 copy".into(),
        OptimizerConfig {
            ema_beta: Some(0.95),
            model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 7 })),
            ..OptimizerConfig::adamw(1e-2)
        },
    ));
    out
}

fn method(c: &OptimizerConfig) -> &'static str {
    if c.method.has_second_moment() {
        "adamw"
    } else {
        "lion"
    }
}

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}

/// The cube tests of this file one at a time: the host-transfer counter is per process.
static CUBE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cube() -> Option<(Backend, std::sync::MutexGuard<'static, ()>)> {
    let guard = CUBE.lock().unwrap_or_else(|p| p.into_inner());
    match linattn::cube::CubeContext::shared() {
        Ok(ctx) => Some((Backend::Cube(ctx), guard)),
        Err(e) => {
            assert!(
                std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
                "LINATTN_REQUIRE_WGPU is set but no wgpu adapter: {e}"
            );
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// Records compared bit for bit (a skipped call's norm is NaN).
fn history_bits(h: &[optim::StepRecord]) -> Vec<(u64, Option<u64>, bool)> {
    h.iter()
        .map(|r| (r.lr.to_bits(), r.grad_norm.map(f64::to_bits), r.skipped))
        .collect()
}

fn state_bits(s: &optim::OptimizerState) -> String {
    let mut s = s.clone();
    let h = history_bits(&s.history);
    s.history.clear();
    format!("{s:?} {h:?}")
}

fn bits(t: &[Tensor]) -> Vec<Vec<u64>> {
    t.iter()
        .map(|t| t.to_f64_vec().iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Stepping `Optimizer` call by call gives `optimize`'s final state and history exactly.
fn matches_optimize(backend: &Backend) {
    let (params, grads) = problem(11);
    for (name, config) in configs() {
        let p = refs(&params);
        let group = Params::new(&p);
        let all: Vec<Vec<&Tensor>> = grads.iter().map(|g| refs(g)).collect();
        let expected = optim::optimize(backend, &config, &schedule(), &group, &all).unwrap();
        let mut opt = Optimizer::new(backend, &group, &config, &schedule()).unwrap();
        for g in &grads {
            opt.step(&refs(g)).unwrap();
        }
        assert_eq!(
            bits(&opt.params().unwrap()),
            bits(&expected.params),
            "{name}"
        );
        assert_eq!(
            history_bits(&opt.history().unwrap()),
            history_bits(&expected.history),
            "{name}"
        );
        let status = opt.status().unwrap();
        assert_eq!(
            (
                status.calls,
                status.steps,
                status.skipped,
                status.last_skipped
            ),
            (CALLS as u64, expected.steps, 1, false),
            "{name}"
        );
        if let Some(ema) = &expected.ema {
            assert_eq!(bits(&opt.ema().unwrap().unwrap()), bits(ema), "{name}");
        }
        let state = opt.state().unwrap();
        let moments: Vec<Tensor> = state
            .exp_avg
            .iter()
            .zip(SHAPES)
            .map(|(v, s)| Tensor::from_f64(s.to_vec(), v.clone()).unwrap())
            .collect();
        let expected_moments: Vec<Tensor> = expected
            .exp_avg
            .iter()
            .map(|t| Tensor::from_f64(t.shape().to_vec(), t.to_f64_vec()).unwrap())
            .collect();
        assert_eq!(bits(&moments), bits(&expected_moments), "{name}");
        println!("{name}: {} calls equal optimize", CALLS);
    }
}

#[test]
fn cpu_optimizer_steps_equal_optimize() {
    matches_optimize(&Backend::Cpu);
}

#[test]
fn cube_optimizer_steps_equal_optimize() {
    let Some((backend, _serial)) = cube() else {
        return;
    };
    matches_optimize(&backend);
}

/// Saving after `split` calls and loading into a fresh optimizer continues the run exactly.
fn resumes_exactly(backend: &Backend, split: usize) {
    let (params, grads) = problem(12);
    let dir = tempfile::tempdir().unwrap();
    for (name, config) in configs() {
        let p = refs(&params);
        let group = Params::new(&p);
        let mut whole = Optimizer::new(backend, &group, &config, &schedule()).unwrap();
        for g in &grads {
            whole.step(&refs(g)).unwrap();
        }
        let mut first = Optimizer::new(backend, &group, &config, &schedule()).unwrap();
        for g in &grads[..split] {
            first.step(&refs(g)).unwrap();
        }
        let path = dir.path().join("state.safetensors");
        first.save(&path).unwrap();
        let saved = first.state().unwrap();
        drop(first);
        // A fresh optimizer from other weights: everything must come from the file.
        let other = tensors(&mut Rng::new(99), 1.0);
        let o = refs(&other);
        let mut resumed = Optimizer::new(backend, &Params::new(&o), &config, &schedule()).unwrap();
        resumed.load(&path).unwrap();
        assert_eq!(
            state_bits(&resumed.state().unwrap()),
            state_bits(&saved),
            "{name}: the loaded state reads back as saved"
        );
        for g in &grads[split..] {
            resumed.step(&refs(g)).unwrap();
        }
        assert_eq!(
            state_bits(&resumed.state().unwrap()),
            state_bits(&whole.state().unwrap()),
            "{name}"
        );
        println!("{name}: saved after {split}, resumed, equal to the uninterrupted run");
    }
}

#[test]
fn cpu_state_saved_and_loaded_continues_bit_for_bit() {
    resumes_exactly(&Backend::Cpu, 7);
}

#[test]
fn cube_state_saved_and_loaded_continues_bit_for_bit() {
    let Some((backend, _serial)) = cube() else {
        return;
    };
    // Across the skipped call 9 too.
    resumes_exactly(&backend, 7);
    resumes_exactly(&backend, 10);
}

/// A state saved on the cube backend loads on the CPU (f32 values widened) and the run goes on
/// there: the result stays within f32 rounding of the CPU's own run.
#[test]
fn cube_state_loads_on_the_cpu() {
    let Some((backend, _serial)) = cube() else {
        return;
    };
    let (params, grads) = problem(13);
    let config = OptimizerConfig {
        ema_beta: Some(0.9),
        ..OptimizerConfig::adamw(1e-2)
    };
    let p = refs(&params);
    let group = Params::new(&p);
    let mut gpu = Optimizer::new(&backend, &group, &config, &schedule()).unwrap();
    for g in &grads[..8] {
        gpu.step(&refs(g)).unwrap();
    }
    let bytes = gpu.to_safetensors().unwrap();
    let mut cpu = Optimizer::new(&Backend::Cpu, &group, &config, &schedule()).unwrap();
    cpu.load_safetensors(&bytes).unwrap();
    let mut cpu_whole = Optimizer::new(&Backend::Cpu, &group, &config, &schedule()).unwrap();
    for g in &grads {
        cpu_whole.step(&refs(g)).unwrap();
    }
    for g in &grads[8..] {
        cpu.step(&refs(g)).unwrap();
    }
    assert_eq!(cpu.status().unwrap(), cpu_whole.status().unwrap());
    for (a, b) in cpu
        .params()
        .unwrap()
        .iter()
        .zip(cpu_whole.params().unwrap())
    {
        let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
        let rel = linattn_reference::rel_rms(&a, &b);
        assert!(rel < 1e-5, "relative rms {rel}");
    }
    // And back: the CPU's f64 state loads on the cube backend.
    let mut back = Optimizer::new(&backend, &group, &config, &schedule()).unwrap();
    back.load_safetensors(&cpu.to_safetensors().unwrap())
        .unwrap();
    assert_eq!(back.status().unwrap(), cpu.status().unwrap());
}

/// Device-resident gradients (cube device tensors, f32 and f16) give the steps host gradients
/// give, and a mix of host and device gradients too.
#[test]
fn cube_device_gradients_equal_host_gradients() {
    let Some((backend, _serial)) = cube() else {
        return;
    };
    let Backend::Cube(ctx) = &backend else {
        unreachable!()
    };
    let (params, grads) = problem(14);
    let config = OptimizerConfig {
        max_grad_norm: Some(1.0),
        ..OptimizerConfig::adamw(1e-2)
    };
    let p = refs(&params);
    let group = Params::new(&p);
    let half = ctx.supports_dtype(DType::F16);
    if !half {
        println!("skipped the f16 part: the adapter stores no f16");
    }
    let mut host = Optimizer::new(&backend, &group, &config, &schedule()).unwrap();
    let mut device = Optimizer::new(&backend, &group, &config, &schedule()).unwrap();
    let mut mixed = Optimizer::new(&backend, &group, &config, &schedule()).unwrap();
    for (k, g) in grads.iter().enumerate() {
        // Odd calls in f16 (rounded on the host for the host run, widened on the device).
        let g: Vec<Tensor> = if half && k % 2 == 1 {
            g.iter().map(|t| t.to_dtype(DType::F16)).collect()
        } else {
            g.clone()
        };
        host.step(&refs(&g)).unwrap();
        let on_device: Vec<linattn::cube::DeviceTensor> = g
            .iter()
            .enumerate()
            .map(|(i, t)| ctx.upload(&format!("g{i}"), t).unwrap())
            .collect();
        let device_refs: Vec<&linattn::cube::DeviceTensor> = on_device.iter().collect();
        let mark = linattn::cube::host_transfer_bytes();
        device.step(&device_refs).unwrap();
        assert_eq!(
            linattn::cube::host_transfer_bytes(),
            mark,
            "a step from device gradients moved bytes through the host"
        );
        let mix: Vec<&dyn linattn::optim::Gradient> =
            vec![&on_device[0], &g[1], &on_device[2], &g[3]];
        mixed.step(&mix).unwrap();
    }
    let want = bits(&host.params().unwrap());
    assert_eq!(bits(&device.params().unwrap()), want);
    assert_eq!(bits(&mixed.params().unwrap()), want);
    assert_eq!(
        history_bits(&device.history().unwrap()),
        history_bits(&host.history().unwrap())
    );
    // The weights stay on the device: one tensor read as a device tensor.
    let w = device
        .as_cube()
        .unwrap()
        .param_tensor(3, vec![33, 2])
        .unwrap();
    assert_eq!(
        ctx.download(&w).unwrap().to_f32_vec(),
        host.params().unwrap()[3].to_f32_vec()
    );
}

/// Per-tensor device copies land in the right bucket when tensors straddle buckets.
#[test]
fn cube_device_gradients_across_buckets() {
    let Some((Backend::Cube(ctx), _serial)) = cube() else {
        return;
    };
    use linattn::optim::cube::{DeviceOptions, FusedOptimizer};
    let sizes = [5usize, 37, 0, 130];
    let mut rng = Rng::new(15);
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| rng.randn(n).iter().map(|&x| x as f32).collect())
        .collect();
    let p: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
    let options = DeviceOptions {
        max_bucket_bytes: Some(16 * 8),
        ..DeviceOptions::default()
    };
    let config = OptimizerConfig::adamw(1e-2);
    let make = || {
        FusedOptimizer::with_options(&ctx, &config, &schedule(), CALLS, &p, &[true; 4], options)
            .unwrap()
    };
    let (mut host, mut device) = (make(), make());
    assert!(host.bucket_count() > 5, "{} buckets", host.bucket_count());
    for _ in 0..3 {
        let g: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| rng.randn(n).iter().map(|&x| x as f32).collect())
            .collect();
        host.set_grads(&g.iter().map(Vec::as_slice).collect::<Vec<_>>())
            .unwrap();
        host.step().unwrap();
        for (i, v) in g.iter().enumerate() {
            let t = ctx
                .upload("g", &Tensor::from_f32(vec![v.len()], v.clone()).unwrap())
                .unwrap();
            device.set_grad_device(i, &t).unwrap();
        }
        device.step().unwrap();
    }
    assert_eq!(device.read_params().unwrap(), host.read_params().unwrap());
    for (i, &n) in sizes.iter().enumerate() {
        let t = device.param_tensor(i, vec![n]).unwrap();
        assert_eq!(
            ctx.download(&t).unwrap().to_f32_vec(),
            host.read_params().unwrap()[i]
        );
    }
}

#[test]
fn bad_gradients_and_state_files_are_typed_errors() {
    let (params, grads) = problem(16);
    let p = refs(&params);
    let group = Params::new(&p);
    let config = OptimizerConfig::adamw(1e-2);
    let mut opt = Optimizer::new(&Backend::Cpu, &group, &config, &schedule()).unwrap();
    let err = opt.step(&refs(&grads[0][..3])).unwrap_err().to_string();
    assert!(err.contains("3 gradients for 4 parameter tensors"), "{err}");
    let mut wrong = grads[0].clone();
    wrong[1] = Tensor::from_f32(vec![1, 7], vec![0.0; 7]).unwrap();
    let err = opt.step(&refs(&wrong)).unwrap_err().to_string();
    assert!(err.contains("grads[1]") && err.contains("[7]"), "{err}");
    assert_eq!(
        opt.status().unwrap().calls,
        0,
        "a refused call is not a call"
    );

    // A cube device gradient given to the CPU optimizer.
    if let Some((Backend::Cube(ctx), _serial)) = cube() {
        let on_device: Vec<linattn::cube::DeviceTensor> = grads[0]
            .iter()
            .map(|t| ctx.upload("g", t).unwrap())
            .collect();
        let err = opt
            .step(&on_device.iter().collect::<Vec<_>>())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cube device tensor") && err.contains("cpu"),
            "{err}"
        );
    }

    opt.step(&refs(&grads[0])).unwrap();
    let bytes = opt.to_safetensors().unwrap();
    // Lion cannot load an AdamW state; other shapes cannot load it; nor can a model with an EMA.
    let mut lion = Optimizer::new(
        &Backend::Cpu,
        &group,
        &OptimizerConfig::lion(1e-3),
        &schedule(),
    )
    .unwrap();
    let err = lion.load_safetensors(&bytes).unwrap_err().to_string();
    assert!(err.contains("adamw") && err.contains("lion"), "{err}");
    let other = [Tensor::from_f32(vec![2], vec![1.0, 2.0]).unwrap()];
    let o = refs(&other);
    let mut small = Optimizer::new(&Backend::Cpu, &Params::new(&o), &config, &schedule()).unwrap();
    let err = small.load_safetensors(&bytes).unwrap_err().to_string();
    assert!(err.contains("4 parameter tensors"), "{err}");
    let ema = OptimizerConfig {
        ema_beta: Some(0.9),
        ..config.clone()
    };
    let mut with_ema = Optimizer::new(&Backend::Cpu, &group, &ema, &schedule()).unwrap();
    let err = with_ema.load_safetensors(&bytes).unwrap_err().to_string();
    assert!(err.contains("EMA"), "{err}");
    // A safetensors file that is not an optimizer state, and a missing file.
    let plain = safetensors::serialize(
        [(
            "x",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    let err = opt.load_safetensors(&plain).unwrap_err().to_string();
    assert!(err.contains("not a linattn optimizer state"), "{err}");
    let err = opt
        .load("/nonexistent/state.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/state.safetensors"), "{err}");
    // A refused load leaves the optimizer as it was.
    assert_eq!(opt.status().unwrap().calls, 1);
}
