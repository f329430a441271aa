//! Correlation keys: extraction from a request (explicit key, or a model's
//! regex over the request key) and rendezvous hashing of keys to replicas.

use regex::Regex;
use std::sync::Arc;

/// A correlation key; cheap to clone.
pub type Key = Arc<str>;

/// How a model turns a request into a key.
#[derive(Debug, Clone)]
pub struct KeyExtractor {
    regex: Option<Regex>,
}

impl KeyExtractor {
    /// Compiles the model's regex once, at load.
    pub fn new(pattern: Option<&str>) -> Result<Self, regex::Error> {
        Ok(Self {
            regex: pattern.map(Regex::new).transpose()?,
        })
    }

    /// The key of a request. With a regex, the key is what it matches in the
    /// request key (the explicit `correlation_key`, else the request id):
    /// the first capture group if it has one, else the whole match; no match
    /// means keyless. Without a regex, the explicit key as given.
    pub fn extract(&self, explicit: Option<&str>, id: &str) -> Option<Key> {
        match &self.regex {
            None => explicit.filter(|k| !k.is_empty()).map(Key::from),
            Some(re) => {
                let source = explicit.unwrap_or(id);
                let caps = re.captures(source)?;
                let m = caps.get(1).or_else(|| caps.get(0))?;
                Some(Key::from(m.as_str()))
            }
        }
    }
}

/// 64-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer: spreads FNV's weak low bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a key once; [`rendezvous`] combines it with each replica id.
pub fn key_hash(key: &str) -> u64 {
    mix(fnv1a(key.as_bytes()))
}

/// Highest-random-weight choice of a replica among `ids`: each key goes to
/// the replica with the largest weight(key, id), so adding or removing a
/// replica moves only the keys whose winner it is.
pub fn rendezvous(hash: u64, ids: impl IntoIterator<Item = usize>) -> Option<usize> {
    ids.into_iter()
        .max_by_key(|&id| mix(hash ^ mix(id as u64 ^ 0x9e37_79b9_7f4a_7c15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_examples_hold() {
        let agent = KeyExtractor::new(Some("/[a-zA-Z0-9]+_[0-9]+_")).unwrap();
        assert_eq!(
            agent
                .extract(None, "/collision/tracking/agent_position/little3_7_42")
                .as_deref(),
            Some("/little3_7_")
        );
        let camera = KeyExtractor::new(Some("/[a-zA-Z0-9]+_")).unwrap();
        assert_eq!(
            camera
                .extract(None, "/collision/tracking/cameras/little3_42")
                .as_deref(),
            Some("/little3_")
        );
    }

    #[test]
    fn extraction_table() {
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a str, Option<&'a str>);
        let cases: &[Case] = &[
            // (regex, explicit key, request id, key)
            (None, Some("user-1"), "id-9", Some("user-1")),
            (None, None, "id-9", None),
            (None, Some(""), "id-9", None),
            (Some("cam([0-9]+)"), None, "/site/cam12/frame/7", Some("12")),
            (
                Some("cam[0-9]+"),
                None,
                "/site/cam12/frame/7",
                Some("cam12"),
            ),
            (
                Some("cam[0-9]+"),
                Some("xcam3y"),
                "/site/cam12",
                Some("cam3"),
            ),
            (Some("cam[0-9]+"), None, "/site/lidar/frame/7", None),
            (Some("^(a)|(b)$"), None, "b", Some("b")),
        ];
        for &(re, explicit, id, want) in cases {
            let x = KeyExtractor::new(re).unwrap();
            assert_eq!(
                x.extract(explicit, id).as_deref(),
                want,
                "{re:?} {explicit:?} {id:?}"
            );
        }
        assert!(KeyExtractor::new(Some("(unclosed")).is_err());
    }

    #[test]
    fn same_key_same_replica() {
        for i in 0..1000 {
            let h = key_hash(&format!("key-{i}"));
            assert_eq!(rendezvous(h, 0..4), rendezvous(h, 0..4));
        }
    }

    #[test]
    fn growing_four_to_five_replicas_moves_about_a_fifth() {
        let n = 20_000;
        let mut moved = 0;
        let mut per_replica = [0usize; 5];
        for i in 0..n {
            let h = key_hash(&format!("agent/{i}"));
            let before = rendezvous(h, 0..4).unwrap();
            let after = rendezvous(h, 0..5).unwrap();
            per_replica[after] += 1;
            if before != after {
                // Only keys won by the new replica move.
                assert_eq!(after, 4);
                moved += 1;
            }
        }
        let frac = moved as f64 / n as f64;
        assert!((0.18..0.22).contains(&frac), "moved {frac}");
        for c in per_replica {
            let share = c as f64 / n as f64;
            assert!(
                (0.18..0.22).contains(&share),
                "uneven spread {per_replica:?}"
            );
        }
    }
}
