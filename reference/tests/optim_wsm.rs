//! WSM merge coefficients worked out by hand, and the weighted average.

use linattn_reference::optim::schedule::Shape;
use linattn_reference::optim::wsm::{merge, merge_coefficients, shape_coefficients};

fn close_all(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a - e).abs() <= 1e-15,
            "got {actual:?}, expected {expected:?}"
        );
    }
}

#[test]
fn linear_decay_is_the_plain_mean() {
    close_all(&shape_coefficients(Shape::Linear, 3), &[0.25; 4]);
    close_all(&shape_coefficients(Shape::Linear, 0), &[1.0]);
}

#[test]
fn cosine_and_sqrt_coefficients() {
    // k = 2: w = [1, f(1/3), f(2/3)] = [1, 0.75, 0.25] -> c = [0.25, 0.5, 0.25].
    close_all(&shape_coefficients(Shape::Cosine, 2), &[0.25, 0.5, 0.25]);
    // 1-sqrt, k = 3: w_i = 1 - sqrt(i / 4) = [1, 0.5, 0.2928932188134524, 0.1339745962155614].
    close_all(
        &shape_coefficients(Shape::OneMinusSqrt, 3),
        &[
            0.5,
            0.207_106_781_186_547_5,
            0.158_918_622_597_891_1,
            0.133_974_596_215_561_4,
        ],
    );
    for k in 1..10 {
        for shape in [Shape::Linear, Shape::Cosine, Shape::OneMinusSqrt] {
            let c = shape_coefficients(shape, k);
            assert!(c.iter().all(|&x| x >= 0.0), "{shape:?} {k}: {c:?}");
            assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        }
    }
    // Any shape: a step function f = 1 on [0, 1/2), 0 after, with k = 3 keeps c_0 = 1 - w_1 = 0,
    // c_1 = w_1 - w_2 = 1 - 0 = 1, the rest 0.
    let step = merge_coefficients(|x| if x < 0.5 { 1.0 } else { 0.0 }, 3);
    close_all(&step, &[0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn merge_is_the_weighted_sum() {
    let a = [1.0, 2.0];
    let b = [3.0, -2.0];
    close_all(&merge(&[&a, &b], &[0.25, 0.75]), &[2.5, -1.0]);
}
