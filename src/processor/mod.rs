//! Processors between the receivers and the batcher. Today: groupbytrace's pure core, which the
//! pipeline wires in once the component model of the architecture issue lands.
// Not yet reachable from `run`: the core is built and tested first (issue 15, step 1).
#![cfg_attr(not(test), allow(dead_code))]

pub(crate) mod groupbytrace;
