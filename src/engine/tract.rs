//! The tract engine: pure Rust, CPU, single-threaded in this build (tract's multithreaded matrix
//! products need its `multithread-mm` feature and rayon, which fastcache does not enable).
//!
//! tract plans a model for concrete input shapes. The plan is made at the first call, from the
//! shapes of the tensors actually passed, and made again whenever they change (a different batch
//! size, say). Planning tries, in order:
//! 1. the typed model with the inputs' symbolic dims, its symbols then bound to the actual sizes
//!    (`set_symbols` on the typed model: this also pins the symbols the exporter left on
//!    intermediate values, which pinning the inputs alone would not reach);
//! 2. the inference model with the inputs pinned to the actual shapes;
//! 3. the same, re-read with the file's `value_info` ignored (exporters sometimes name one dim
//!    differently in different places, which tract cannot unify);
//! 4. no typed model at all: tract's inference-level plan, which evaluates each operator as it
//!    comes. Slower, but it runs models tract cannot type, such as a fastcache rewrite with more
//!    than one `If`: tract 0.23.9 gives every typed `If` node the name "If", so a second one
//!    is refused as a duplicate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, IntoTValue,
    TDim, TValue, TVec, TypedModel, TypedRunnableModel,
};
use tract_onnx::tract_hir::infer::InferenceSimplePlan;

use super::{DType, Engine, EngineInfo, HostState, ModelSpec, StateSlot, Tensor, TensorMap};

const TRACT_VERSION: &str = "0.23.9";

pub struct TractEngine {
    path: PathBuf,
    spec: ModelSpec,
    inference: InferenceModel,
    /// The typed model with symbolic input dims, when tract can type it without pinned shapes.
    typed: Result<TypedModel, String>,
    plan: Option<Plan>,
    /// How the current plan was made, for the report.
    plan_note: String,
    state: HostState,
}

/// One way of getting a typed model for the given input shapes.
type Attempt<'a> = dyn Fn(&TractEngine) -> anyhow::Result<TypedModel> + 'a;

struct Plan {
    shapes: Vec<Vec<usize>>,
    runnable: Runnable,
}

#[derive(Clone)]
enum Runnable {
    Typed(Arc<TypedRunnableModel>),
    Inference(Arc<InferenceSimplePlan>),
}

/// A tract error as the user reads it: its chain of causes on one line. Never its `Debug` form,
/// which carries tract's internal stack trace whenever `RUST_BACKTRACE` is set.
fn tract_error(error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow!("{:#}", error.into())
}

impl Runnable {
    fn run(&self, inputs: TVec<TValue>) -> anyhow::Result<TVec<TValue>> {
        match self {
            Runnable::Typed(plan) => plan.run(inputs),
            Runnable::Inference(plan) => plan.run(inputs),
        }
        .map_err(tract_error)
    }
}

impl TractEngine {
    pub fn load(path: &Path) -> anyhow::Result<TractEngine> {
        let (_, spec) = ModelSpec::load(path)?;
        if let Some(t) = spec.first_of_type(DType::BF16) {
            bail!(
                "{}: '{}' is bfloat16, which tract {TRACT_VERSION} has no type for; run it with `--engine ort` (on a GPU provider: ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul, Add or Mul)",
                path.display(),
                t.name
            );
        }
        let inference = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| tract_error(e).context(format!("tract cannot read {}", path.display())))?;
        let outlets = inference.input_outlets().map_err(|e| anyhow!("{e}"))?;
        let names: Vec<&str> = outlets
            .iter()
            .map(|o| inference.node(o.node).name.as_str())
            .collect();
        let expected: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
        if names != expected {
            bail!(
                "tract sees the inputs of {} as [{}], the file declares [{}]",
                path.display(),
                names.join(", "),
                expected.join(", ")
            );
        }
        let outputs = inference
            .output_outlets()
            .map_err(|e| anyhow!("{e}"))?
            .len();
        if outputs != spec.outputs.len() {
            bail!(
                "tract sees {outputs} outputs in {}, the file declares {}",
                path.display(),
                spec.outputs.len()
            );
        }
        let typed = inference
            .clone()
            .into_typed()
            .map_err(|e| format!("{:#}", tract_error(e)));
        Ok(TractEngine {
            path: path.to_path_buf(),
            spec,
            inference,
            typed,
            plan: None,
            plan_note: String::new(),
            state: HostState::default(),
        })
    }

    fn plan_for(&mut self, shapes: &[Vec<usize>]) -> anyhow::Result<Runnable> {
        if let Some(plan) = &self.plan
            && plan.shapes == shapes
        {
            return Ok(plan.runnable.clone());
        }
        let mut failures = Vec::new();
        let attempts: [(&str, &Attempt); 3] = [
            ("symbols bound on the typed model", &|me| {
                me.typed_with_symbols(shapes)
            }),
            ("input shapes pinned", &|me| {
                me.pinned(me.inference.clone(), shapes)
            }),
            ("input shapes pinned, value_info ignored", &|me| {
                let model = tract_onnx::onnx()
                    .with_ignore_value_info(true)
                    .model_for_path(&me.path)
                    .map_err(tract_error)?;
                me.pinned(model, shapes)
            }),
        ];
        for (how, attempt) in attempts {
            let planned = attempt(self).and_then(|typed| {
                let optimized = typed.into_optimized().map_err(tract_error)?;
                optimized.into_runnable().map_err(tract_error)
            });
            match planned {
                Ok(runnable) => return Ok(self.keep_plan(shapes, Runnable::Typed(runnable), how)),
                Err(e) => failures.push(format!("{how}: {e:#}")),
            }
        }
        // Declared intermediate shapes keep their symbols at this level (nothing binds them), so
        // they are dropped; the inputs' actual shapes are all tract needs to run.
        let how = "inference-level plan (tract cannot type this model)";
        let runnable = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(&self.path)
            .map_err(tract_error)
            .and_then(|model| self.pin_inputs(model, shapes))
            .and_then(|model| model.into_runnable().map_err(tract_error));
        match runnable {
            Ok(runnable) => return Ok(self.keep_plan(shapes, Runnable::Inference(runnable), how)),
            Err(e) => failures.push(format!("{how}: {e:#}")),
        }
        bail!(
            "tract cannot plan {} for input shapes {:?}:\n  {}",
            self.path.display(),
            shapes,
            failures.join("\n  ")
        )
    }

    fn keep_plan(&mut self, shapes: &[Vec<usize>], runnable: Runnable, how: &str) -> Runnable {
        self.plan = Some(Plan {
            shapes: shapes.to_vec(),
            runnable: runnable.clone(),
        });
        self.plan_note = how.to_string();
        runnable
    }

    fn typed_with_symbols(&self, shapes: &[Vec<usize>]) -> anyhow::Result<TypedModel> {
        let typed = self.typed.as_ref().map_err(|e| anyhow!("{e}"))?;
        let mut values: HashMap<_, TDim> = HashMap::new();
        for (index, shape) in shapes.iter().enumerate() {
            let fact = typed.input_fact(index).map_err(|e| anyhow!("{e}"))?;
            for (dim, &size) in fact.shape.iter().zip(shape) {
                if let TDim::Sym(symbol) = dim {
                    values.insert(symbol.clone(), TDim::Val(size as i64));
                }
            }
        }
        typed.set_symbols(&values).map_err(tract_error)
    }

    fn pinned(&self, model: InferenceModel, shapes: &[Vec<usize>]) -> anyhow::Result<TypedModel> {
        let model = self.pin_inputs(model, shapes)?;
        model.into_typed().map_err(tract_error)
    }

    /// The model with every input's fact set to its actual type and shape.
    fn pin_inputs(
        &self,
        mut model: InferenceModel,
        shapes: &[Vec<usize>],
    ) -> anyhow::Result<InferenceModel> {
        for (index, (shape, spec)) in shapes.iter().zip(&self.spec.inputs).enumerate() {
            let dtype = spec.dtype.context("unsupported input type")?;
            let fact = match dtype {
                DType::F32 => InferenceFact::dt_shape(f32::datum_type(), shape),
                DType::F16 => InferenceFact::dt_shape(half::f16::datum_type(), shape),
                DType::BF16 => bail!("tract has no bfloat16 (refused when loaded)"),
                DType::I64 => InferenceFact::dt_shape(i64::datum_type(), shape),
                DType::I32 => InferenceFact::dt_shape(i32::datum_type(), shape),
                DType::Bool => InferenceFact::dt_shape(bool::datum_type(), shape),
            };
            model.set_input_fact(index, fact).map_err(tract_error)?;
        }
        Ok(model)
    }
}

impl Engine for TractEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            engine: format!("tract {TRACT_VERSION}"),
            provider: "cpu".into(),
            threads: "1 thread (tract is single-threaded in this build)".into(),
            state_memory: "host".into(),
        }
    }

    fn bind_state(&mut self, slots: Vec<StateSlot>) -> anyhow::Result<()> {
        self.state.bind(&self.spec, slots)
    }

    fn state(&self) -> anyhow::Result<TensorMap> {
        Ok(self.state.values().clone())
    }

    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let bound = self.state.bound_inputs();
        self.spec.check_inputs(inputs, &bound)?;
        let inputs = self.spec.to_model_types(inputs);
        let mut values: TVec<TValue> = Default::default();
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.spec.inputs.len());
        for spec in &self.spec.inputs {
            let tensor = inputs
                .get(&spec.name)
                .or_else(|| self.state.values().get(&spec.name))
                .expect("check_inputs saw every input");
            shapes.push(tensor.shape().to_vec());
            values.push(to_tract(tensor)?);
        }
        let runnable = self.plan_for(&shapes)?;
        let spec = &self.spec;
        let outputs = runnable.run(values).map_err(|e| {
            let half = spec.first_of_type(DType::F16).is_some();
            let hint = if half {
                format!(" (a float16 model: tract {TRACT_VERSION} does not run every float16 op; `--engine ort` does)")
            } else {
                String::new()
            };
            tract_error(e).context(format!("tract failed to run {}{hint}", self.path.display()))
        })?;
        let mut result = TensorMap::new();
        for (spec, value) in self.spec.outputs.iter().zip(outputs) {
            result.insert(spec.name.clone(), from_tract(&spec.name, &value)?);
        }
        self.state.absorb(&mut result)?;
        Ok(result)
    }

    fn plan(&self) -> Option<String> {
        (!self.plan_note.is_empty()).then(|| self.plan_note.clone())
    }
}

fn to_tract(tensor: &Tensor) -> anyhow::Result<TValue> {
    let t: tract_onnx::prelude::Tensor = match tensor {
        Tensor::F32(a) => a.clone().into(),
        Tensor::F16(a) => a.clone().into(),
        Tensor::BF16(_) => bail!("tract has no bfloat16 (refused when loaded)"),
        Tensor::I64(a) => a.clone().into(),
        Tensor::I32(a) => a.clone().into(),
        Tensor::Bool(a) => a.clone().into(),
    };
    Ok(t.into_tvalue())
}

fn from_tract(name: &str, value: &TValue) -> anyhow::Result<Tensor> {
    let dt = value.datum_type();
    let read = |e: anyhow::Error| anyhow!("cannot read output '{name}': {e}");
    Ok(if dt == f32::datum_type() {
        Tensor::F32(value.to_plain_array_view::<f32>().map_err(read)?.to_owned())
    } else if dt == half::f16::datum_type() {
        Tensor::F16(
            value
                .to_plain_array_view::<half::f16>()
                .map_err(read)?
                .to_owned(),
        )
    } else if dt == i64::datum_type() {
        Tensor::I64(value.to_plain_array_view::<i64>().map_err(read)?.to_owned())
    } else if dt == i32::datum_type() {
        Tensor::I32(value.to_plain_array_view::<i32>().map_err(read)?.to_owned())
    } else if dt == bool::datum_type() {
        Tensor::Bool(
            value
                .to_plain_array_view::<bool>()
                .map_err(read)?
                .to_owned(),
        )
    } else {
        bail!("output '{name}' has element type {dt:?}, which fastcache does not read")
    })
}
