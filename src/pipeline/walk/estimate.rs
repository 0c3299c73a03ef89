//! What a ResourceSpans record takes once prost decodes it: the schema walk, tallying the heap
//! of every message it validates. The processors charge this to a request's memory budget
//! before they decode a record.
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;

use super::{Reader, Wire, resource_spans};

/// What a walk adds up while it validates: nothing (`()`) or the heap prost's decoded form
/// takes ([`Heap`]). One schema walk serves both; with `()` (the receiver's walk when no
/// pipeline processes what it accepts) every call compiles away, so that walk is what it was
/// without it.
pub(super) trait Tally: Default {
    /// What a message adds up to: `()` or bytes.
    type Cost: Copy;
    /// A string or bytes field, or an unknown length-delimited one (all prost keeps of it).
    fn bytes(&mut self, len: usize);
    /// One more element, `size` bytes inline, of the message's repeated field `field`.
    fn element(&mut self, field: u64, size: usize);
    /// A child message's cost.
    fn child(&mut self, cost: Self::Cost);
    /// The message's cost, its repeated fields' Vecs included.
    fn cost(self) -> Self::Cost;
}

impl Tally for () {
    type Cost = ();
    #[inline(always)]
    fn bytes(&mut self, _: usize) {}
    #[inline(always)]
    fn element(&mut self, _: u64, _: usize) {}
    #[inline(always)]
    fn child(&mut self, _: ()) {}
    #[inline(always)]
    fn cost(self) {}
}

/// What the allocator takes per allocation beyond its bytes, at least.
const ALLOCATION_OVERHEAD: usize = 32;

/// The distinct repeated fields a message of the schema has at most (a Span: attributes,
/// events, links).
const REPEATED: usize = 3;

/// The heap one decoded message takes (not its own inline size): every string and bytes field
/// an allocation of its own, every child's heap, and every repeated field a Vec that grew by
/// doubling (so up to twice its elements, at least four). Small: one is made per message walked,
/// every KeyValue and AnyValue included, in the receiver's walk.
#[derive(Default)]
pub(super) struct Heap {
    cost: usize,
    /// Field number, elements and their inline size, per repeated field met, in `used` slots.
    repeated: [(u64, usize, usize); REPEATED],
    used: usize,
}

impl Tally for Heap {
    type Cost = usize;

    #[inline(always)]
    fn bytes(&mut self, len: usize) {
        self.cost = self.cost.saturating_add(len.saturating_add(ALLOCATION_OVERHEAD));
    }

    #[inline(always)]
    fn element(&mut self, field: u64, size: usize) {
        if let Some(slot) = self.repeated[..self.used].iter_mut().find(|s| s.0 == field) {
            slot.1 += 1;
        } else if let Some(slot) = self.repeated.get_mut(self.used) {
            *slot = (field, 1, size);
            self.used += 1;
        } else {
            // More repeated fields than the schema has: each element charged as a Vec of its own.
            self.cost = self.cost.saturating_add(vec_cost(1, size));
        }
    }

    #[inline(always)]
    fn child(&mut self, cost: usize) {
        self.cost = self.cost.saturating_add(cost);
    }

    #[inline(always)]
    fn cost(self) -> usize {
        let mut cost = self.cost;
        for &(_, count, element) in &self.repeated[..self.used] {
            cost = cost.saturating_add(vec_cost(count, element));
        }
        cost
    }
}

/// A Vec of `count` elements of `element` bytes, grown by doubling.
#[inline(always)]
fn vec_cost(count: usize, element: usize) -> usize {
    let capacity = count.next_power_of_two().max(4);
    capacity.saturating_mul(element).saturating_add(ALLOCATION_OVERHEAD)
}

/// An upper bound of the memory prost takes to decode one ResourceSpans record (a field-1
/// record, as the pipeline holds it), and the processors' working copy of it. Known message
/// fields are followed by the schema; anything else is counted as bytes, which is all prost
/// keeps of it. The record passed the receiver's walk, so it is well formed; one that does not
/// pass it now is counted by its length (prost refuses it next).
pub(crate) fn decoded_estimate(record: &[u8]) -> usize {
    match Reader::new(record).field() {
        Ok(Some((_, Wire::Len(message)))) => resource_spans::<Heap>(message)
            .map_or_else(|_| decoded_of_heap(record.len()), |(_, cost)| decoded_of_heap(cost)),
        _ => decoded_of_heap(record.len()),
    }
}

/// The estimate of a record whose messages' heap is `heap`.
pub(super) fn decoded_of_heap(heap: usize) -> usize {
    // Twice: the decoded record and the growth while statements edit it (attribute values set
    // from others, kvlists built), which a statement list cannot make larger than the record.
    std::mem::size_of::<ResourceSpans>()
        .saturating_add(heap)
        .saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testdata;
    use crate::pipeline::wire::encode_record;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};

    /// The estimate bounds what prost's decoded form holds, counted field by field, on
    /// realistic and on hostile shapes (many empty elements where the schema repeats).
    #[test]
    fn estimate_bounds_the_decoded_size() {
        let mut shapes = vec![testdata::resource_spans("svc", 1, 3, 50)];
        let mut hostile = testdata::resource_spans("svc", 1, 1, 0);
        hostile.scope_spans[0].spans = vec![Span::default(); 10_000];
        shapes.push(hostile);
        let mut attrs = testdata::resource_spans("svc", 1, 1, 1);
        attrs.scope_spans[0].spans[0].attributes = vec![KeyValue::default(); 10_000];
        shapes.push(attrs);
        for rs in shapes {
            let record = encode_record(&rs);
            let estimate = decoded_estimate(&record);
            let held = heap_of(&rs);
            assert!(estimate >= held, "{estimate} < {held}");
            assert!(estimate <= 8 * held.max(record.len()) + 4096, "{estimate} for {held}");
        }
    }

    /// The heap a decoded ResourceSpans holds, with Vecs at their exact length (a lower bound of
    /// what prost allocated).
    fn heap_of(rs: &ResourceSpans) -> usize {
        use std::mem::size_of;
        let kvs = |a: &[KeyValue]| std::mem::size_of_val(a) + a.iter().map(|kv| kv.key.len()).sum::<usize>();
        let mut total = rs.scope_spans.len() * size_of::<ScopeSpans>();
        total += rs.resource.as_ref().map_or(0, |r| kvs(&r.attributes));
        for ss in &rs.scope_spans {
            total += ss.spans.len() * size_of::<Span>();
            for s in &ss.spans {
                total += kvs(&s.attributes) + s.name.len() + s.trace_id.len() + s.span_id.len();
            }
        }
        total
    }

    #[test]
    fn a_malformed_record_is_bounded_by_its_length() {
        for bytes in [&b""[..], &[0x0a], &[0x0a, 0x05, 0xff], &[0x0a, 0x02, 0x12, 0x7f]] {
            assert!(decoded_estimate(bytes) < 4096);
        }
    }
}
