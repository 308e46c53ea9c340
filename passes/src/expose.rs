//! `expose`: makes chosen internal tensors extra graph outputs, after the existing ones, which
//! stay as they were. Calibration uses it to record every block's input and output.
//!
//! Each new output gets the value's type: element type and shape from shape propagation (which
//! also reads the file's `value_info`), symbolic dims kept symbolic, unknown dims left unset.

use crate::analysis::shapes::Shapes;
use crate::analysis::structure::DitStack;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::pass::Pass;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expose {
    pub values: Vec<String>,
}

impl Expose {
    pub fn new<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Expose {
        Expose {
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// Every residual-stream tensor of a stack: X, then each block's output.
    pub fn block_boundaries(stack: &DitStack) -> Expose {
        Expose::new(stack.boundaries())
    }
}

impl Pass for Expose {
    fn name(&self) -> &str {
        "expose"
    }

    fn run(&self, model: &mut Model) -> Result<()> {
        let shapes = Shapes::infer(model);
        let defined = model.graph.defined_values();
        for value in &self.values {
            if model.graph.outputs.iter().any(|o| o.name == *value) {
                continue; // already an output: nothing to add, and never a duplicate
            }
            if !defined.contains(value) {
                return Err(Error::Invalid(format!(
                    "cannot expose '{value}': no value of that name in the main graph"
                )));
            }
            let info = shapes
                .value_info(value)
                .or_else(|| model.graph.value_type(value))
                .ok_or_else(|| {
                    Error::Unsupported(format!(
                        "cannot expose '{value}': its element type is unknown"
                    ))
                })?;
            model.graph.outputs.push(info);
        }
        Ok(())
    }
}
