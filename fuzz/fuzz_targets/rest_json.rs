//! A REST infer body as JSON (no binary extension): decoded, then served.
#![no_main]

use bytes::Bytes;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use shoal::api::http::decode_rest_request;

fuzz_target!(|data: &[u8]| {
    let h = shoal_fuzz::harness();
    let body = Bytes::copy_from_slice(data);
    match decode_rest_request("m", &HeaderMap::new(), body, &h.shm) {
        Ok(request) => shoal_fuzz::serve(h, request, None),
        Err(e) => shoal_fuzz::refused(&e),
    }
});
