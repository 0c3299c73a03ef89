//! Processors between the receivers and the batcher. Built as pure cores, unit-tested without
//! sockets: groupbytrace (issue 15, wired into each exporter's stage by `grouping`) and the
//! OTTL language of `filter` and `transform` (issue 13).

pub(crate) mod groupbytrace;
pub(crate) mod grouping;
// Not yet reachable from `run`; see above.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod ottl;
