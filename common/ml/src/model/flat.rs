//! A model as one flat `Vec<f32>`: the unit of aggregation, masking and noise.
//!
//! Order: Burn's `Module` derive visits fields in declaration order (nested
//! modules depth-first; `Vec` items by index; inside `Linear` and `Conv2d`:
//! weight then bias), and every tensor is laid out row-major in its own
//! shape. The [`ParamLayout`] lists each parameter's dotted path and shape in
//! that order; its SHA-256 is the model's shape signature, so two peers
//! agree on a layout before they add vectors.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use sha2::{Digest, Sha256};

/// One parameter tensor in flattening order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    /// The tensor's module path (e.g. `conv1.weight`).
    pub path: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
}

/// All parameter tensors of a model, in flattening order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    /// Every parameter tensor, in flattening order.
    pub entries: Vec<ParamEntry>,
}

impl ParamLayout {
    /// The layout of `model`'s parameters.
    pub fn of<M: Module>(model: &M) -> Self {
        let mut v = LayoutVisitor::default();
        model.visit(&mut v);
        Self { entries: v.entries }
    }

    /// Total number of parameter values.
    pub fn param_count(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// SHA-256 over `path:dims;` for every entry, in order.
    pub fn signature(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for e in &self.entries {
            let dims: Vec<String> = e.shape.iter().map(usize::to_string).collect();
            h.update(format!("{}:{};", e.path, dims.join("x")).as_bytes());
        }
        h.finalize().into()
    }
}

#[derive(Default)]
struct LayoutVisitor {
    path: Vec<String>,
    entries: Vec<ParamEntry>,
}

impl ModuleVisitor for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.entries.push(ParamEntry {
            path: self.path.join("."),
            shape: param.lazy_shape().to_vec(),
        });
    }
}

struct FlattenVisitor {
    out: Vec<f32>,
}

impl ModuleVisitor for FlattenVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("float parameters convert to f32");
        self.out.extend_from_slice(&values);
    }
}

/// The model's parameters as one vector, in [`ParamLayout`] order.
pub fn to_flat<M: Module>(model: &M) -> Vec<f32> {
    let mut v = FlattenVisitor {
        out: Vec::with_capacity(model.num_params()),
    };
    model.visit(&mut v);
    v.out
}

struct LoadMapper<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for LoadMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.lazy_shape();
        let n = shape.num_elements();
        let values = self.values[self.offset..self.offset + n].to_vec();
        self.offset += n;
        // Created on the parameter's own device, so an autodiff parameter stays
        // trainable; `transform_for_load` keeps its id and require-grad flag.
        let tensor = Tensor::<D>::from_data(TensorData::new(values, shape), &param.lazy_device());
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Replaces every parameter with the matching slice of `values`.
///
/// Panics if `values.len() != model.num_params()`: callers check the length
/// (see [`super::ModelError::WrongLength`]) before they get here.
pub fn load_flat<M: Module>(model: M, values: &[f32]) -> M {
    assert_eq!(values.len(), model.num_params(), "flat vector length");
    let mut mapper = LoadMapper { values, offset: 0 };
    let model = model.map(&mut mapper);
    debug_assert_eq!(mapper.offset, values.len());
    model
}
