//! Analyses of a model that the passes build on: shape propagation ([`shapes`]), the data-flow
//! view ([`flow`]), DiT structure discovery ([`structure`]), the cost model ([`cost`]) and a
//! serialisable summary of what was found ([`report`]).

pub mod cost;
pub mod flow;
pub mod report;
pub mod shapes;
pub mod structure;
pub mod synthetic;

pub use cost::Flops;
pub use flow::ValueKind;
pub use shapes::{Shapes, ValueShape, int_values};
pub use structure::{
    Block, BlockKind, Condition, ConditionKind, DitStack, InputRoles, Joint, Region, SideInput,
    Source, Structure, StructureError, Sublayer, SublayerKind, discover,
};
