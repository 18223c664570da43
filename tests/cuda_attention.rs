//! The CUDA attention kernels on a real GPU: the emulated matrix (tests/cuda_attention_emulated.rs)
//! plus T = S = 1000 everywhere and the Radial masks of 8 frames x 256 tokens, through the host
//! path (`forward_on` / `backward_on` on a `CudaExec`) and the device-slice API (bf16 outputs, the
//! dense FlashAttention entry points, an uploaded plan reused across calls). Prints
//! `skipped: no CUDA device` without a GPU.

#[path = "common/attention_cases.rs"]
mod attention_cases;

use attention_cases::{AttnCase, MaskKind, radial_config, run_all};
use half::bf16;
use linattn::attention::cuda::device::{
    self, DeviceAttention, DeviceForwardState, DeviceGrads, DeviceTensor, DeviceTensorMut,
};
use linattn::attention::plan::AttentionPlan;
use linattn::attention::{self, Attention, AttnDims, RadialModel};
use linattn::cuda::CudaContext;
use linattn::cuda::exec::CudaExec;
use linattn::reference::rel_rms;
use linattn::reference::testing::Rng;
use linattn::{Backend, DType, Error, Tensor};

fn context() -> Option<CudaContext> {
    match CudaContext::shared() {
        Ok(c) => Some(c),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

const BLOCKS: [(usize, usize); 4] = [(64, 64), (64, 128), (128, 64), (128, 128)];
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

#[test]
fn dense_and_full_plan() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let mut runs = Vec::new();
    for d in [64, 128] {
        for (t, s) in [
            (64, 64),
            (200, 256),
            (256, 200),
            (256, 256),
            (1000, 1000),
            (1000, 200),
        ] {
            for block in BLOCKS {
                for causal in [false, true] {
                    for (i, mask) in [MaskKind::Dense, MaskKind::FullPlan]
                        .into_iter()
                        .enumerate()
                    {
                        let case = AttnCase::new(t, s, d, block, causal, mask);
                        runs.push((case, DTYPES[(i + runs.len()) % 2]));
                    }
                }
            }
        }
    }
    run_all(&exec, &runs);
}

#[test]
fn random_masks() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let mut runs = Vec::new();
    for d in [64, 128] {
        for (t, s) in [(200, 256), (256, 200), (1000, 1000)] {
            for block in BLOCKS {
                for causal in [false, true] {
                    for (diagonal, empty_row) in [(true, false), (false, false), (true, true)] {
                        let mask = MaskKind::Random {
                            density: 0.5,
                            diagonal,
                            empty_row,
                        };
                        let dtype = DTYPES[runs.len() % 2];
                        runs.push((AttnCase::new(t, s, d, block, causal, mask), dtype));
                    }
                }
            }
        }
    }
    run_all(&exec, &runs);
}

/// The small Radial masks of the emulated suite and 8 frames x 256 tokens (T = 2048) under every
/// rule, blocks of 64 and 128.
#[test]
fn radial_masks() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let mut configs = vec![
        radial_config(RadialModel::Paper, 5, 48, 64, 1.0),
        radial_config(RadialModel::Wan, 4, 64, 64, 1.0),
        radial_config(RadialModel::Hunyuan, 4, 128, 128, 0.95),
    ];
    for block in [64, 128] {
        configs.push(radial_config(RadialModel::Paper, 8, 256, block, 1.0));
        configs.push(radial_config(RadialModel::Wan, 8, 256, block, 1.0));
        configs.push(radial_config(RadialModel::Hunyuan, 8, 256, block, 0.95));
    }
    let mut runs = Vec::new();
    for cfg in configs {
        for d in [64, 128] {
            for causal in [false, true] {
                let dtype = DTYPES[runs.len() % 2];
                runs.push((AttnCase::radial(cfg, d, causal), dtype));
            }
        }
    }
    run_all(&exec, &runs);
}

#[test]
fn strides_sharp_softmax_and_host_api() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let random = MaskKind::Random {
        density: 0.4,
        diagonal: true,
        empty_row: true,
    };
    let runs = vec![
        (
            AttnCase::new(1000, 777, 64, (64, 128), false, random.clone()).with_batch_heads(2, 3),
            DType::BF16,
        ),
        (
            AttnCase::new(513, 1000, 128, (128, 64), true, MaskKind::Dense).with_batch_heads(3, 2),
            DType::F16,
        ),
        (
            AttnCase::new(1000, 1000, 64, (64, 64), true, MaskKind::HostDense).with_q_gain(4.0),
            DType::BF16,
        ),
        (
            AttnCase::new(1000, 1000, 128, (128, 128), false, random).with_q_gain(4.0),
            DType::F16,
        ),
    ];
    run_all(&exec, &runs);
}

/// `attention::forward/backward(&Backend::Cuda(..))` agree with the executor path and reject
/// unsupported dtypes and head dims with typed errors.
#[test]
fn backend_entry_points_and_errors() {
    let Some(ctx) = context() else { return };
    let backend = Backend::Cuda(ctx);
    let mut rng = Rng::new(3);
    let mk = |rng: &mut Rng, shape: &[usize], dtype: DType| {
        let n: usize = shape.iter().product();
        Tensor::from_f64(shape.to_vec(), rng.randn(n))
            .unwrap()
            .to_dtype(dtype)
    };
    let (q, k, v) = (
        mk(&mut rng, &[1, 300, 2, 64], DType::BF16),
        mk(&mut rng, &[1, 300, 2, 64], DType::BF16),
        mk(&mut rng, &[1, 300, 2, 64], DType::BF16),
    );
    let args = Attention::dense(&q, &k, &v).with_causal(true);
    let gpu = attention::forward(&backend, &args).unwrap();
    let cpu = attention::forward(&Backend::Cpu, &args).unwrap();
    assert!(rel_rms(&gpu.o.to_f64_vec(), &cpu.o.to_f64_vec()) <= 4e-3);
    let d_o = mk(&mut rng, &[1, 300, 2, 64], DType::BF16);
    let g = attention::backward(&backend, &args, &d_o).unwrap();
    let c = attention::backward(&Backend::Cpu, &args, &d_o).unwrap();
    assert!(rel_rms(&g.dk.to_f64_vec(), &c.dk.to_f64_vec()) <= 5e-3);

    let q32 = q.to_dtype(DType::F32);
    let (k32, v32) = (k.to_dtype(DType::F32), v.to_dtype(DType::F32));
    assert!(matches!(
        attention::forward(&backend, &Attention::dense(&q32, &k32, &v32)),
        Err(Error::UnsupportedDtype { .. })
    ));
    let q96 = mk(&mut rng, &[1, 10, 1, 96], DType::BF16);
    assert!(matches!(
        attention::forward(&backend, &Attention::dense(&q96, &q96, &q96)),
        Err(Error::UnsupportedHeadDim { .. })
    ));
}

fn upload_bf16(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    t: &Tensor,
) -> cudarc::driver::CudaSlice<bf16> {
    let data: Vec<bf16> = t.to_f64_vec().iter().map(|&x| bf16::from_f64(x)).collect();
    stream.clone_htod(&data).unwrap()
}

fn download<T: cudarc::driver::DeviceRepr + Copy + Into<f64>>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    s: &cudarc::driver::CudaSlice<T>,
) -> Vec<f64> {
    stream
        .clone_dtoh(s)
        .unwrap()
        .into_iter()
        .map(Into::into)
        .collect()
}

fn bf16_vec(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    s: &cudarc::driver::CudaSlice<bf16>,
) -> Vec<f64> {
    stream
        .clone_dtoh(s)
        .unwrap()
        .into_iter()
        .map(|x| x.to_f64())
        .collect()
}

/// The device-slice API: an uploaded Radial plan reused for two heads' worth of calls, bf16
/// outputs (o and the gradients), and the dense FlashAttention entry points, against the host path.
#[test]
fn device_slice_api() {
    let Some(ctx) = context() else { return };
    let stream = ctx.stream().clone();
    let cfg = radial_config(RadialModel::Hunyuan, 8, 256, 128, 0.95);
    let mask = attention::radial_mask(&cfg).unwrap();
    let (b, t, h, d) = (1, cfg.total_tokens(), 2, 128);
    let dims = AttnDims { b, t, s: t, h, d };
    let mut rng = Rng::new(11);
    let mk = |rng: &mut Rng| {
        Tensor::from_f64(vec![b, t, h, d], rng.randn(b * t * h * d))
            .unwrap()
            .to_dtype(DType::BF16)
    };
    let (q, k, v, d_o) = (mk(&mut rng), mk(&mut rng), mk(&mut rng), mk(&mut rng));
    let (q_dev, k_dev, v_dev) = (
        upload_bf16(&stream, &q),
        upload_bf16(&stream, &k),
        upload_bf16(&stream, &v),
    );
    let do_dev = upload_bf16(&stream, &d_o);

    for masked in [true, false] {
        let host_args = Attention {
            q: &q,
            k: &k,
            v: &v,
            scale: None,
            causal: false,
            mask: masked.then_some(&mask),
        };
        let want = attention::forward(&Backend::Cuda(ctx.clone()), &host_args).unwrap();
        let want_g = attention::backward(&Backend::Cuda(ctx.clone()), &host_args, &d_o).unwrap();
        let problem = DeviceAttention {
            dims,
            q: DeviceTensor::BF16(&q_dev),
            k: DeviceTensor::BF16(&k_dev),
            v: DeviceTensor::BF16(&v_dev),
            scale: None,
            causal: false,
            value_check: linattn::ValueCheck::On,
        };
        let mut o = stream.alloc_zeros::<bf16>(dims.q_len()).unwrap();
        let mut lse = stream.alloc_zeros::<f32>(dims.lse_len()).unwrap();
        let mut gq = stream.alloc_zeros::<bf16>(dims.q_len()).unwrap();
        let mut gk = stream.alloc_zeros::<bf16>(dims.kv_len()).unwrap();
        let mut gv = stream.alloc_zeros::<bf16>(dims.kv_len()).unwrap();
        if masked {
            let plan = AttentionPlan::new(Some(&mask), t, t, 128, 128, false).unwrap();
            let plan = device::upload_plan(&ctx, &stream, &plan).unwrap();
            // The same plan serves repeated calls.
            for _ in 0..2 {
                device::forward(
                    &ctx,
                    &stream,
                    &plan,
                    &problem,
                    DeviceTensorMut::BF16(&mut o),
                    &mut lse,
                )
                .unwrap();
            }
            device::backward(
                &ctx,
                &stream,
                &plan,
                &problem,
                DeviceForwardState {
                    o: DeviceTensor::BF16(&o),
                    lse: &lse,
                    d_o: DeviceTensor::BF16(&do_dev),
                },
                DeviceGrads {
                    dq: DeviceTensorMut::BF16(&mut gq),
                    dk: DeviceTensorMut::BF16(&mut gk),
                    dv: DeviceTensorMut::BF16(&mut gv),
                },
            )
            .unwrap();
        } else {
            device::flash_attention_dense_forward(
                &ctx,
                &stream,
                &problem,
                DeviceTensorMut::BF16(&mut o),
                &mut lse,
            )
            .unwrap();
            device::flash_attention_dense_backward(
                &ctx,
                &stream,
                &problem,
                DeviceForwardState {
                    o: DeviceTensor::BF16(&o),
                    lse: &lse,
                    d_o: DeviceTensor::BF16(&do_dev),
                },
                DeviceGrads {
                    dq: DeviceTensorMut::BF16(&mut gq),
                    dk: DeviceTensorMut::BF16(&mut gk),
                    dv: DeviceTensorMut::BF16(&mut gv),
                },
            )
            .unwrap();
        }
        // bf16 outputs: one more rounding than the f32 host path.
        let o_err = rel_rms(&bf16_vec(&stream, &o), &want.o.to_f64_vec());
        let lse_err = rel_rms(&download(&stream, &lse), &want.lse.to_f64_vec());
        let dq_err = rel_rms(&bf16_vec(&stream, &gq), &want_g.dq.to_f64_vec());
        let dk_err = rel_rms(&bf16_vec(&stream, &gk), &want_g.dk.to_f64_vec());
        let dv_err = rel_rms(&bf16_vec(&stream, &gv), &want_g.dv.to_f64_vec());
        println!(
            "device API masked={masked}: o {o_err:.2e} lse {lse_err:.2e} dq {dq_err:.2e} dk {dk_err:.2e} dv {dv_err:.2e}"
        );
        assert!(
            o_err <= 4e-3 && lse_err <= 1e-6 && dq_err <= 5e-3 && dk_err <= 5e-3 && dv_err <= 5e-3
        );
    }

    // A plan for other sequence lengths is rejected.
    let other = AttentionPlan::new(None, 64, 64, 64, 64, false).unwrap();
    let other = device::upload_plan(&ctx, &stream, &other).unwrap();
    let problem = DeviceAttention {
        dims,
        q: DeviceTensor::BF16(&q_dev),
        k: DeviceTensor::BF16(&k_dev),
        v: DeviceTensor::BF16(&v_dev),
        scale: None,
        causal: false,
        value_check: linattn::ValueCheck::On,
    };
    let mut o = stream.alloc_zeros::<f32>(dims.q_len()).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(dims.lse_len()).unwrap();
    assert!(matches!(
        device::forward(
            &ctx,
            &stream,
            &other,
            &problem,
            DeviceTensorMut::F32(&mut o),
            &mut lse
        ),
        Err(Error::InvalidArgument(_))
    ));
    // A NaN in v is the host API's error (the value check is on by default).
    let mut v_bad: Vec<bf16> = stream.clone_dtoh(&v_dev).unwrap();
    v_bad[7] = bf16::NAN;
    let v_bad = stream.clone_htod(&v_bad).unwrap();
    let plan = device::upload_plan(
        &ctx,
        &stream,
        &AttentionPlan::new(None, dims.t, dims.s, 64, 64, false).unwrap(),
    )
    .unwrap();
    let bad = DeviceAttention {
        v: DeviceTensor::BF16(&v_bad),
        ..problem
    };
    let err = device::forward(
        &ctx,
        &stream,
        &plan,
        &bad,
        DeviceTensorMut::F32(&mut o),
        &mut lse,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, index: 7, .. } if tensor == "v"),
        "{err}"
    );
}
