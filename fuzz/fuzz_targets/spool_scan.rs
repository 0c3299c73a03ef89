//! Spool segments: scanning any bytes never panics, and what it reads back goes through the
//! batcher without a panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use otlp_relay::batch::{BatchSettings, Batcher};
use otlp_relay::pipeline::{Destination, Item};
use otlp_relay::spool::{frame, record_to_routed};

fuzz_target!(|data: &[u8]| {
    let scan = frame::scan(data);
    let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
        send_batch_size: 2,
        send_batch_max_size: 2,
        timeout: Duration::from_secs(1),
    });
    for record in scan.records {
        let routed = record_to_routed(record, Some(1));
        if routed.item.chunk.spans > 0 {
            drop(batcher.add(routed.destination, routed.item, Instant::now()));
        }
    }
    drop(batcher.flush());
});
