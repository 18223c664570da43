//! The host API's validation (typed errors) and the `run optimize` / `run schedule` commands,
//! on the CPU backend (and on the cube backend when an adapter is present).

use std::f64::consts::PI;

use clap::Parser;
use linattn::backend::Backend;
use linattn::cli::io::{Inputs, Outputs};
use linattn::cli::{Cli, execute};
use linattn::error::Error;
use linattn::optim::{
    self, DecayMode, Method, OptimizerConfig, Params, RefineFor, Schedule, refined_schedule,
    validate_schedule,
};
use linattn::tensor::{DType, Tensor};
use linattn_reference::optim::step::{StepConfig, TensorState, fused_step};

fn t(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape, v).unwrap()
}

fn run(
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &[&Tensor],
    grads: &[Vec<&Tensor>],
) -> Result<optim::OptimizeOutput, Error> {
    optim::optimize(&Backend::Cpu, config, schedule, &Params::new(params), grads)
}

#[test]
fn bad_hyperparameters_are_typed_errors() {
    let p = t(vec![2], vec![1.0, 2.0]);
    let g = t(vec![2], vec![0.1, 0.2]);
    let schedule = Schedule::Constant { warmup: 0 };
    let invalid = |config: OptimizerConfig| {
        let result = run(&config, &schedule, &[&p], &[vec![&g]]);
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{config:?}: {result:?}"
        );
    };
    invalid(OptimizerConfig::adamw(-1e-3));
    invalid(OptimizerConfig::adamw(f64::NAN));
    invalid(OptimizerConfig {
        weight_decay: f64::NAN,
        ..OptimizerConfig::adamw(1e-3)
    });
    invalid(OptimizerConfig {
        weight_decay: -0.1,
        ..OptimizerConfig::adamw(1e-3)
    });
    for (beta1, beta2) in [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (f64::NAN, 0.9)] {
        invalid(OptimizerConfig {
            method: Method::AdamW {
                beta1,
                beta2,
                eps: 1e-8,
            },
            ..OptimizerConfig::adamw(1e-3)
        });
        invalid(OptimizerConfig {
            method: Method::Lion { beta1, beta2 },
            ..OptimizerConfig::lion(1e-4)
        });
    }
    invalid(OptimizerConfig {
        method: Method::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: f64::NAN,
        },
        ..OptimizerConfig::adamw(1e-3)
    });
    invalid(OptimizerConfig {
        max_grad_norm: Some(0.0),
        ..OptimizerConfig::adamw(1e-3)
    });
    invalid(OptimizerConfig {
        ema_beta: Some(1.5),
        ..OptimizerConfig::adamw(1e-3)
    });
    invalid(OptimizerConfig {
        decay_mode: DecayMode::FullyDecoupled,
        ..OptimizerConfig::adamw(0.0)
    });
}

#[test]
fn bad_tensors_and_schedules_are_typed_errors() {
    let config = OptimizerConfig::adamw(1e-3);
    let schedule = Schedule::Constant { warmup: 0 };
    let p = t(vec![2], vec![1.0, 2.0]);
    let g3 = t(vec![3], vec![0.1, 0.2, 0.3]);
    assert!(matches!(
        run(&config, &schedule, &[&p], &[vec![&g3]]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        run(&config, &schedule, &[&p], &[vec![]]),
        Err(Error::InvalidArgument(_))
    ));
    let nan = t(vec![1], vec![f32::NAN]);
    assert!(matches!(
        run(&config, &schedule, &[&nan], &[]),
        Err(Error::NonFinite { .. })
    ));
    let decay = [true, false];
    assert!(matches!(
        optim::optimize(
            &Backend::Cpu,
            &config,
            &schedule,
            &Params {
                tensors: &[&p],
                decay: Some(&decay),
            },
            &[],
        ),
        Err(Error::InvalidArgument(_))
    ));
    for bad in [
        Schedule::Cosine {
            warmup: 0,
            total: 10,
            min_ratio: 2.0,
            num_cycles: 0.5,
        },
        Schedule::InverseSqrt {
            warmup: 0,
            timescale: Some(0),
        },
        Schedule::OneCycle {
            total: 2,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            anneal: optim::Anneal::Cos,
        },
        Schedule::Sequential { phases: vec![] },
    ] {
        assert!(
            matches!(validate_schedule(&bad), Err(Error::InvalidArgument(_))),
            "{bad:?}"
        );
        assert!(matches!(
            run(&config, &bad, &[&p], &[]),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        refined_schedule(&[1.0, 0.0, 2.0], 1, RefineFor::Sgd),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        refined_schedule(&[1.0], 1, RefineFor::Sgd),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        optim::merge(&Backend::Cpu, &[vec![&p]], &[0.5, 0.5], DType::F32),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        optim::merge(
            &Backend::Cpu,
            &[vec![&p], vec![&g3]],
            &[0.5, 0.5],
            DType::F32
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn cpu_optimize_is_the_reference_step_sequence() {
    let config = OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(0.5),
        ..OptimizerConfig::adamw(0.01)
    };
    let schedule = Schedule::Linear {
        warmup: 1,
        total: 3,
    };
    let p = t(vec![3], vec![1.0, -2.0, 0.5]);
    let grads = [
        t(vec![3], vec![0.1, 0.2, -0.3]),
        t(vec![3], vec![f32::INFINITY, 0.0, 0.0]),
        t(vec![3], vec![-0.4, 0.1, 0.2]),
    ];
    let refs: Vec<Vec<&Tensor>> = grads.iter().map(|g| vec![g]).collect();
    let out = run(&config, &schedule, &[&p], &refs).unwrap();

    let step_config = StepConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(0.5),
        ..StepConfig::new(Method::adamw())
    };
    let mut states = vec![TensorState::new(
        p.to_f64_vec(),
        &step_config.method,
        false,
        true,
    )];
    let mut steps = 0;
    for (k, g) in grads.iter().enumerate() {
        let lr = 0.01 * schedule.multiplier(k);
        fused_step(
            &step_config,
            lr,
            0.01,
            &mut steps,
            &mut states,
            &[&g.to_f64_vec()],
        );
    }
    assert_eq!(out.steps, 2);
    assert_eq!(out.params[0].to_f64_vec(), states[0].param);
    assert_eq!(
        out.exp_avg_sq.as_ref().unwrap()[0].to_f64_vec(),
        states[0].exp_avg_sq
    );
    let lrs: Vec<f64> = out.history.iter().map(|r| r.lr).collect();
    assert_eq!(lrs, [0.0, 0.01, 0.005]);
    assert!(out.history[1].skipped);
}

fn cli(args: &[&str]) -> Result<(), Error> {
    let cli = Cli::try_parse_from(args).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    execute(cli).map(|_| ())
}

fn read(path: &std::path::Path) -> Inputs {
    Inputs::read(Some(path)).unwrap()
}

#[test]
fn run_schedule_writes_the_multipliers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lr.safetensors");
    let out_str = out.to_str().unwrap();
    cli(&[
        "linattn", "run", "schedule", "--output", out_str, "--kind", "cosine", "--total", "100",
        "--warmup", "10",
    ])
    .unwrap();
    let lr = read(&out).float("lr").unwrap().to_f64_vec();
    assert_eq!(lr.len(), 100);
    let expected = [
        (0, 0.0),
        (9, 0.9),
        (10, 1.0),
        (99, 0.5 * (1.0 - (PI / 90.0).cos())),
    ];
    for (k, e) in expected {
        assert!((lr[k] - e).abs() < 1e-7, "k = {k}: {} vs {e}", lr[k]);
    }
    cli(&[
        "linattn",
        "run",
        "schedule",
        "--output",
        out_str,
        "--kind",
        "wsd",
        "--total",
        "100",
        "--warmup",
        "10",
        "--decay-steps",
        "20",
        "--min-ratio",
        "0.1",
        "--decay-shape",
        "1-sqrt",
    ])
    .unwrap();
    let lr = read(&out).float("lr").unwrap().to_f64_vec();
    // warmup from r = 0.1; stable until 79; k = 90: 0.1 + 0.9 (1 - sqrt(0.5)).
    for (k, e) in [
        (0, 0.1),
        (79, 1.0),
        (80, 1.0),
        (90, 0.1 + 0.9 * (1.0 - 0.5f64.sqrt())),
    ] {
        assert!((lr[k] - e).abs() < 1e-7, "k = {k}: {} vs {e}", lr[k]);
    }
    for kind in ["constant", "linear", "inverse-sqrt", "rex", "one-cycle"] {
        cli(&[
            "linattn", "run", "schedule", "--output", out_str, "--kind", kind, "--total", "50",
        ])
        .unwrap();
        assert_eq!(read(&out).float("lr").unwrap().numel(), 50);
    }
    assert!(matches!(
        cli(&[
            "linattn",
            "run",
            "schedule",
            "--output",
            out_str,
            "--kind",
            "cosine-ish",
            "--total",
            "5"
        ]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        cli(&[
            "linattn", "run", "schedule", "--output", out_str, "--kind", "wsd", "--total", "5"
        ]),
        Err(Error::InvalidArgument(_))
    ));
}

fn write_inputs(path: &std::path::Path, param: Tensor, grads: Tensor) {
    let mut out = Outputs::default();
    out.float("param", param);
    out.float("grads", grads);
    out.write(path).unwrap();
}

fn cli_optimize(device: &str, input: &str, output: &str, optimizer: &str) {
    cli(&[
        "linattn",
        "run",
        "optimize",
        "--device",
        device,
        "--input",
        input,
        "--output",
        output,
        "--optimizer",
        optimizer,
        "--lr",
        "0.1",
        "--weight-decay",
        "0.05",
        "--schedule",
        "linear",
        "--warmup",
        "1",
    ])
    .unwrap();
}

#[test]
fn run_optimize_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let param = t(vec![5], vec![0.5, -1.0, 2.0, 0.0, 0.25]);
    let mut g: Vec<f32> = (0..15)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    g[7] = f32::NAN; // step 1 is skipped
    write_inputs(&input, param.clone(), t(vec![3, 5], g.clone()));
    cli_optimize(
        "cpu",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        "adamw",
    );
    let cpu = read(&output);
    let names = cpu.names();
    for name in ["param", "exp_avg", "exp_avg_sq", "lr", "skipped"] {
        assert!(names.contains(&name), "{names:?}");
    }
    // linear warmup 1 over total S = 3: f = [0, 1, 1/2].
    let lr = cpu.float("lr").unwrap().to_f64_vec();
    assert_eq!(lr, vec![0.0, 0.1f32 as f64, 0.05f32 as f64]);
    assert_eq!(cpu.opt_int("skipped").unwrap().unwrap().data, vec![0, 1, 0]);

    // The same through the reference crate: step 0 at lr 0, step 1 skipped, step 2 at 0.05.
    let config = StepConfig {
        weight_decay: 0.05,
        ..StepConfig::new(Method::adamw())
    };
    let mut states = vec![TensorState::new(
        param.to_f64_vec(),
        &config.method,
        false,
        true,
    )];
    let mut steps = 0;
    for (k, lr) in [0.0, 0.1, 0.05].into_iter().enumerate() {
        let gk: Vec<f64> = g[k * 5..k * 5 + 5].iter().map(|&x| x as f64).collect();
        fused_step(&config, lr, 0.1, &mut steps, &mut states, &[&gk]);
    }
    let expected: Vec<f64> = states[0].param.iter().map(|&x| x as f32 as f64).collect();
    assert_eq!(cpu.float("param").unwrap().to_f64_vec(), expected);

    // Lion has no second moment.
    cli_optimize(
        "cpu",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        "lion",
    );
    assert!(!read(&output).names().contains(&"exp_avg_sq"));

    // The cube backend agrees with the CPU when an adapter exists.
    if Backend::new(linattn::DeviceRequest::Cube).is_err() {
        println!("skipped (cube part): no wgpu adapter");
        return;
    }
    cli_optimize(
        "cube",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        "adamw",
    );
    let cube = read(&output);
    for name in ["param", "exp_avg", "exp_avg_sq", "lr"] {
        let a = cube.float(name).unwrap().to_f64_vec();
        let b = cpu.float(name).unwrap().to_f64_vec();
        assert!(
            linattn_reference::within_tolerance(&a, &b, 1e-6),
            "{name}: {a:?} vs {b:?}"
        );
    }
    assert_eq!(
        cube.opt_int("skipped").unwrap().unwrap().data,
        vec![0, 1, 0]
    );

    // Bad input shapes are typed errors.
    write_inputs(&input, param, t(vec![3, 4], vec![0.0; 12]));
    let err = cli(&[
        "linattn",
        "run",
        "optimize",
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--lr",
        "0.1",
    ]);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
}

#[test]
fn merge_on_cpu_is_the_weighted_sum() {
    let a = t(vec![2], vec![1.0, 2.0]);
    let b = t(vec![2], vec![3.0, -2.0]);
    let out = optim::merge(
        &Backend::Cpu,
        &[vec![&a], vec![&b]],
        &[0.25, 0.75],
        DType::F64,
    )
    .unwrap();
    assert_eq!(out[0].to_f64_vec(), vec![2.5, -1.0]);
    let c = optim::wsm_coefficients(optim::Shape::Linear, 1);
    assert_eq!(c, vec![0.5, 0.5]);
    let out = optim::merge(&Backend::Cpu, &[vec![&a], vec![&b]], &c, DType::BF16).unwrap();
    assert_eq!(out[0].dtype(), DType::BF16);
    match out[0].data() {
        linattn::tensor::TensorData::BF16(d) => assert_eq!(d[0].to_f64(), 2.0),
        other => panic!("{other:?}"),
    }
}
