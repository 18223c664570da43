//! A minimal host tensor: a shape and a typed, row-major buffer. It is the currency of the
//! backend-independent API (`linear::forward(&backend, ...)`), of `linattn run` (safetensors in and
//! out) and of `linattn validate`. Device-resident APIs live in the `cube` and `cuda` modules.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element types the library accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub fn name(&self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "float32" => Ok(DType::F32),
            "f64" | "float64" => Ok(DType::F64),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype `{other}` (expected f16, bf16, f32 or f64)"
            ))),
        }
    }
}

/// The typed storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F16(d) => d.len(),
            TensorData::BF16(d) => d.len(),
            TensorData::F32(d) => d.len(),
            TensorData::F64(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
        }
    }
}

/// What shape validation reads of a tensor: its shape and dtype. Implemented by host [`Tensor`]s,
/// device tensors and [`TensorMeta`], so one validator (e.g.
/// [`LinearAttention::validate_layout`](crate::linear::LinearAttention::validate_layout)) checks
/// a problem wherever its data lives, without touching the data.
pub trait Shaped {
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> DType;
}

/// A tensor's shape and dtype without its data: framework adapters validate a problem from the
/// framework tensors' metadata before any kernel is queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn new(shape: Vec<usize>, dtype: DType) -> Self {
        TensorMeta { shape, dtype }
    }
}

impl Shaped for TensorMeta {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Shaped for Tensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.data.dtype()
    }
}

/// A host tensor: shape plus row-major data.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Checks that `shape` holds exactly `data.len()` elements.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::InvalidArgument(format!(
                "tensor of shape {shape:?} needs {numel} elements, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, TensorData::F32(data))
    }

    pub fn from_f64(shape: Vec<usize>, data: Vec<f64>) -> Result<Self> {
        Self::new(shape, TensorData::F64(data))
    }

    /// An f64 tensor from values the caller guarantees fit `shape` (internal results).
    pub(crate) fn f64_unchecked(shape: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            data: TensorData::F64(data),
        }
    }

    /// An f32 tensor from values the caller guarantees fit `shape` (internal results).
    #[cfg_attr(not(any(feature = "cube", feature = "cuda")), allow(dead_code))] // GPU backends only
    pub(crate) fn f32_unchecked(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            data: TensorData::F32(data),
        }
    }

    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Self {
        let n = shape.iter().product();
        let data = match dtype {
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
        };
        Tensor { shape, data }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The values widened (or kept) to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F16(d) => d.iter().map(|x| x.to_f64()).collect(),
            TensorData::BF16(d) => d.iter().map(|x| x.to_f64()).collect(),
            TensorData::F32(d) => d.iter().map(|&x| x as f64).collect(),
            TensorData::F64(d) => d.clone(),
        }
    }

    /// The values converted to f32 (f64 rounds to nearest).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(d) => d.iter().map(|x| x.to_f32()).collect(),
            TensorData::F32(d) => d.clone(),
            TensorData::F64(d) => d.iter().map(|&x| x as f32).collect(),
        }
    }

    /// A copy converted to `dtype` (round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match dtype {
            DType::F64 => TensorData::F64(self.to_f64_vec()),
            DType::F32 => TensorData::F32(self.to_f32_vec()),
            DType::F16 => {
                TensorData::F16(self.to_f64_vec().into_iter().map(f16::from_f64).collect())
            }
            DType::BF16 => {
                TensorData::BF16(self.to_f64_vec().into_iter().map(bf16::from_f64).collect())
            }
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: Vec<usize>) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(Error::InvalidArgument(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.numel()
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Index and value of the first NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        fn scan<T: Copy>(d: &[T], f: impl Fn(T) -> f64) -> Option<(usize, f64)> {
            d.iter()
                .map(|&x| f(x))
                .enumerate()
                .find(|(_, x)| !x.is_finite())
        }
        match &self.data {
            TensorData::F16(d) => scan(d, |x| x.to_f64()),
            TensorData::BF16(d) => scan(d, |x| x.to_f64()),
            TensorData::F32(d) => scan(d, |x| x as f64),
            TensorData::F64(d) => scan(d, |x| x),
        }
    }
}

/// The device backends compute in f32 and take f32 / f16 / bf16 inputs. The host API narrows an f64
/// input to f32 on the host before it reaches them (one rounding per value, what a caller's
/// `to_dtype(F32)` would do), so that f64 tensors (the reference's, the helpers') run on every
/// backend; values that overflow f32 there are then refused as non-finite. `None`: not f64, use
/// the tensor as it is.
pub(crate) fn narrowed_for_device(t: &Tensor) -> Option<Tensor> {
    (t.dtype() == DType::F64).then(|| t.to_dtype(DType::F32))
}

/// [`narrowed_for_device`] over several tensors for `backend`: `None` on the CPU or when none is
/// f64, else one entry per tensor (`Some` for each narrowed one).
pub(crate) fn narrowed_all(
    backend: &crate::Backend,
    tensors: &[Option<&Tensor>],
) -> Option<Vec<Option<Tensor>>> {
    if matches!(backend, crate::Backend::Cpu) {
        return None;
    }
    let narrowed: Vec<Option<Tensor>> = tensors
        .iter()
        .map(|t| t.and_then(narrowed_for_device))
        .collect();
    narrowed.iter().any(Option::is_some).then_some(narrowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_element_count() {
        assert!(Tensor::from_f32(vec![2, 3], vec![0.0; 6]).is_ok());
        assert!(matches!(
            Tensor::from_f32(vec![2, 3], vec![0.0; 5]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn conversions_round_trip_exact_values() {
        let t = Tensor::from_f64(vec![4], vec![1.0, -0.5, 0.25, 3.0]).unwrap();
        for dt in [DType::F16, DType::BF16, DType::F32] {
            assert_eq!(t.to_dtype(dt).to_f64_vec(), t.to_f64_vec(), "{dt}");
        }
    }

    #[test]
    fn finds_first_non_finite() {
        let t = Tensor::from_f32(vec![3], vec![1.0, f32::NAN, f32::INFINITY]).unwrap();
        let (i, v) = t.first_non_finite().unwrap();
        assert_eq!(i, 1);
        assert!(v.is_nan());
        assert!(
            Tensor::from_f32(vec![1], vec![0.0])
                .unwrap()
                .first_non_finite()
                .is_none()
        );
    }
}
