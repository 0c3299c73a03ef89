//! The pipeline between receivers and exporters: admission (memory budget, bounded queues,
//! fan-out to every exporter at once or not at all) and the items that flow through it.
pub mod wire;
