//! A serialized BYTES tensor (4-byte little-endian length, then the
//! element, repeated): split and counted without a panic, consistently,
//! and what splits joins back to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shoal::tensor::{count_bytes_elements, join_bytes_elements, split_bytes_elements};

fuzz_target!(|data: &[u8]| {
    let split = split_bytes_elements(&Bytes::copy_from_slice(data));
    let count = count_bytes_elements(data);
    assert_eq!(
        split.as_ref().map(Vec::len),
        count,
        "split and count disagree"
    );
    if let Some(elements) = split {
        let joined = join_bytes_elements(elements.iter().map(|e| e.as_ref()));
        assert_eq!(joined, data, "join(split(x)) != x");
    }
});
