//! pagewire: moves virtual-machine memory pages between hosts during live migration.

pub mod codec;
pub mod synth;
