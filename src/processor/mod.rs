//! Processors between the receivers and the batcher. Built here first as pure cores, unit-tested
//! without sockets: groupbytrace (issue 15) and the OTTL language of `filter` and `transform`
//! (issue 13). The pipeline wires them in on the architecture issue's component model.
// Not yet reachable from `run`; see above.
#![cfg_attr(not(test), allow(dead_code))]

pub(crate) mod groupbytrace;
pub(crate) mod ottl;
