//! Any bytes as a safetensors file: the header reader either refuses them or returns a header
//! whose tensors tile the data section exactly, with sizes that match shape and dtype.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpress_engine::safetensors::read_header;
use shardpress_engine::source::MemSource;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(header) = read_header(&MemSource::new("fuzz.safetensors", data.to_vec())) else {
        return;
    };
    let data_len = len - header.data_start();
    let mut at = 0;
    for t in &header.tensors {
        assert_eq!(t.start, at, "{} does not start where the previous ended", t.name);
        assert!(t.end >= t.start && t.end <= data_len, "{} out of bounds", t.name);
        let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let size = numel.and_then(|n| t.dtype.byte_size(n));
        assert_eq!(size, Some(t.byte_len()), "{}: size disagrees with shape", t.name);
        at = t.end;
    }
    assert_eq!(at, data_len, "tensors do not cover the data section");
});
