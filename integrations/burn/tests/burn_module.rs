//! A burn module mixing burn ops and linattn ops (projections, a log-sigmoid gate, linattn's
//! `gla`, an output projection, a loss) gets the same gradients on wgpu and on NdArray, and
//! f16 inputs give f16 outputs within f16 rounding of the reference.

mod common;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{DType, Device, Tensor};
use common::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Module, Debug)]
struct GlaLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    g: Linear,
    o: Linear,
    #[module(skip)]
    heads: usize,
}

impl GlaLayer {
    /// The same weights on any device: drawn from `seed` on the host.
    fn new(width: usize, heads: usize, seed: u64, device: &Device) -> GlaLayer {
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = (width as f64).powf(-0.5);
        let mut lin = || {
            let w = rounded(&values(&mut rng, width * width, -bound, bound));
            let b = rounded(&values(&mut rng, width, -bound, bound));
            let mut l: Linear = LinearConfig::new(width, width).init(device);
            l.weight = Param::from_tensor(tensor(&w, [width, width], device));
            l.bias = Some(Param::from_tensor(tensor(&b, [width], device)));
            l
        };
        GlaLayer {
            q: lin(),
            k: lin(),
            v: lin(),
            g: lin(),
            o: lin(),
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, width] = x.dims();
        let split = |y: Tensor<3>| y.reshape([b, t, self.heads, width / self.heads]);
        let q = split(self.q.forward(x.clone()));
        let k = split(self.k.forward(x.clone()));
        let v = split(self.v.forward(x.clone()));
        // GLA's gate: log-sigmoid of a projection (all <= 0), scaled down as in fla (/16).
        let g = split(log_sigmoid(self.g.forward(x)) / 16.0);
        let o = linattn_burn::gla(q, k, v, g).expect("valid shapes");
        self.o.forward(o.reshape([b, t, width]))
    }
}

fn grads_on(x: &[f64], shape: [usize; 3], heads: usize, device: &Device) -> Vec<Vec<f64>> {
    let device = device.clone().autodiff();
    let layer = GlaLayer::new(shape[2], heads, 17, &device);
    let x = tensor(x, shape, &device);
    let loss = layer.forward(x).powf_scalar(2.0).mean();
    let grads = loss.backward();
    [&layer.q, &layer.k, &layer.v, &layer.g, &layer.o]
        .iter()
        .map(|l| to_vec(&l.weight.val().grad(&grads).expect("a weight gradient")))
        .collect()
}

#[test]
fn a_module_gets_the_same_gradients_on_wgpu_and_ndarray() {
    let Some(gpu) = wgpu() else { return };
    let cpu = ndarray();
    let (b, t, width, heads) = (2, 23, 32, 4);
    let mut rng = StdRng::seed_from_u64(3);
    let x = rounded(&values(&mut rng, b * t * width, -1.0, 1.0));
    let on_cpu = grads_on(&x, [b, t, width], heads, &cpu);
    let on_gpu = grads_on(&x, [b, t, width], heads, &gpu);
    for (i, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
        let e = rel_rms(g, c);
        assert!(e <= 1e-5, "weight {i}: wgpu vs ndarray {e:.2e}");
        println!("weight {i}: wgpu vs ndarray {e:.2e}");
    }
}

#[test]
fn f16_inputs_give_f16_outputs() {
    let Some(gpu) = wgpu() else { return };
    if !gpu.supports_dtype(DType::F16) {
        println!("skipped: this adapter has no f16");
        return;
    }
    let case = Case::causal(
        "f16 GLA",
        GateCase::Vector,
        linattn_burn::Form::Chunkwise { chunk: 16 },
    );
    let data = Data::new(&case, 11);
    // The reference sees the f16-rounded inputs.
    let r16 =
        |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect() };
    let data16 = Data {
        q: r16(&data.q),
        k: r16(&data.k),
        v: r16(&data.v),
        g: r16(&data.g),
        g_bwd: r16(&data.g_bwd),
        h0: r16(&data.h0),
        d_o: r16(&data.d_o),
        d_ht: r16(&data.d_ht),
    };
    let want = reference(&case, &data16);
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let f16 = |d: &[f64], s: [usize; 4]| tensor(d, s, &gpu).cast(DType::F16);
    let out = linattn_burn::LinearAttention::causal(
        f16(&data16.q, [b, t, h, k]),
        f16(&data16.k, [b, t, h, k]),
        f16(&data16.v, [b, t, h, v]),
    )
    .with_gate(linattn_burn::Gate::Vector(f16(&data16.g, [b, t, h, k])))
    .with_form(case.form)
    .forward()
    .unwrap();
    assert_eq!(out.o.dtype(), DType::F16);
    // f16 has an 11-bit significand: the outputs are rounded to ~5e-4 relative.
    let e = rel_rms(&to_vec(&out.o), &want[0].1);
    assert!(e <= 2e-3, "f16 o: relative RMS error {e:.2e}");
    println!("f16 o: relative RMS error {e:.2e}");
}
