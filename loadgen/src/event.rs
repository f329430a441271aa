//! The events that travel through the pipeline, and their wire format: a
//! small binary header, then the raw tensor bytes (no JSON, unlike Crayfish).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// An input event: `rows` data points of the model's input shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// When the producer was scheduled to send it, in ns since the run
    /// started: latency counts from here, so a stall cannot hide.
    pub scheduled_ns: u64,
    pub key: Option<String>,
    pub rows: u32,
    pub payload: Bytes,
}

/// What became of an event, as the processor writes it to the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Scored,
    Rejected,
    TimedOut,
    TransportError,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Scored,
        Outcome::Rejected,
        Outcome::TimedOut,
        Outcome::TransportError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Scored => "scored",
            Outcome::Rejected => "rejected",
            Outcome::TimedOut => "timed_out",
            Outcome::TransportError => "transport_error",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.code() == c)
    }
}

/// An output event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub seq: u64,
    pub scheduled_ns: u64,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed event: {0}")]
pub struct DecodeError(&'static str);

impl Event {
    pub fn encode(&self) -> Bytes {
        let key = self.key.as_deref().unwrap_or("").as_bytes();
        let mut b = BytesMut::with_capacity(22 + key.len() + self.payload.len());
        b.put_u64_le(self.seq);
        b.put_u64_le(self.scheduled_ns);
        b.put_u16_le(key.len() as u16);
        b.put_slice(key);
        b.put_u32_le(self.rows);
        b.put_slice(&self.payload);
        b.freeze()
    }

    /// Decodes without copying the payload.
    pub fn decode(mut b: Bytes) -> Result<Self, DecodeError> {
        if b.len() < 18 {
            return Err(DecodeError("short header"));
        }
        let seq = b.get_u64_le();
        let scheduled_ns = b.get_u64_le();
        let klen = b.get_u16_le() as usize;
        if b.len() < klen + 4 {
            return Err(DecodeError("short key"));
        }
        let key = b.split_to(klen);
        let key = if key.is_empty() {
            None
        } else {
            Some(String::from_utf8(key.to_vec()).map_err(|_| DecodeError("key is not UTF-8"))?)
        };
        let rows = b.get_u32_le();
        Ok(Self {
            seq,
            scheduled_ns,
            key,
            rows,
            payload: b,
        })
    }
}

impl Output {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(17);
        b.put_u64_le(self.seq);
        b.put_u64_le(self.scheduled_ns);
        b.put_u8(self.outcome.code());
        b.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Self, DecodeError> {
        if b.len() != 17 {
            return Err(DecodeError("output is not 17 bytes"));
        }
        let seq = b.get_u64_le();
        let scheduled_ns = b.get_u64_le();
        let outcome = Outcome::from_code(b.get_u8()).ok_or(DecodeError("unknown outcome"))?;
        Ok(Self {
            seq,
            scheduled_ns,
            outcome,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for key in [None, Some("agent-7".to_string())] {
            let e = Event {
                seq: 42,
                scheduled_ns: 123_456,
                key,
                rows: 2,
                payload: Bytes::from(vec![1u8; 64]),
            };
            assert_eq!(Event::decode(e.encode()).unwrap(), e);
        }
        let o = Output {
            seq: 9,
            scheduled_ns: 10,
            outcome: Outcome::TimedOut,
        };
        assert_eq!(Output::decode(o.encode()).unwrap(), o);
        assert!(Event::decode(Bytes::from_static(b"short")).is_err());
        assert!(Output::decode(Bytes::from(vec![0u8; 17 + 1])).is_err());
    }
}
