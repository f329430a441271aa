//! A REST infer body with the binary tensor extension. The case is one
//! byte that picks how `Inference-Header-Content-Length` relates to the
//! JSON header (exact, one short, one long), then the JSON header, a
//! newline, and the tensors' bytes: mutating the header keeps the length
//! right, so the cases get past it to the binary part.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use shoal::api::http::decode_rest_request;

fuzz_target!(|data: &[u8]| {
    let [how, rest @ ..] = data else { return };
    let Some(split) = rest.iter().position(|b| *b == b'\n') else {
        return;
    };
    let header_len = match how % 4 {
        0 | 1 => split,
        2 => split.saturating_sub(1),
        _ => split + 1,
    };
    let mut body = Vec::with_capacity(rest.len() - 1);
    body.extend_from_slice(&rest[..split]);
    body.extend_from_slice(&rest[split + 1..]);
    let mut headers = HeaderMap::new();
    headers.insert(
        "inference-header-content-length",
        HeaderValue::from(header_len),
    );
    let h = shoal_fuzz::harness();
    match decode_rest_request("m", &headers, Bytes::from(body), &h.shm) {
        Ok(request) => shoal_fuzz::serve(h, request, None),
        Err(e) => shoal_fuzz::refused(&e),
    }
});
