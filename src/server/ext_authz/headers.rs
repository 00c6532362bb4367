//! The headers of one request as a decision reads them ([`Headers`]): each name once, in lower
//! case, repeated headers joined into one value as Envoy joins them in `CheckRequest.headers`.
//!
//! `Check` decodes Envoy's header map straight into one ([`Headers::merge_entry`]): each name
//! and value is a slice of the received message (no copy, no hashing), checked as UTF-8 as
//! prost checks a `map<string, string>`. Forward auth, Envoy's raw `header_map` and the public
//! [`super::RoutePolicy::rules_for_request`] build one from owned strings
//! ([`Headers::joined`], [`Headers::from_map`]).

use std::{collections::HashMap, ops::Range};

use bytes::{Buf, Bytes};
use bytestring::ByteString;
use prost::{
    encoding::{skip_field, DecodeContext, WireType},
    DecodeError, Message,
};

/// Up to this many headers, a name is found by scanning; past it, through an index (so that a
/// hostile message with a million header entries is decoded in linear time).
const SCANNED: usize = 32;

/// A request's headers: each name once, the last value given for it. Two are equal when they
/// hold the same names with the same values, in any order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Headers {
    entries: Vec<(ByteString, ByteString)>,
    /// Each name's entry, once there are more than [`SCANNED`].
    index: Option<HashMap<ByteString, usize>>,
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl Headers {
    /// The headers of `map` (its names as they are).
    pub(crate) fn from_map(map: &HashMap<String, String>) -> Self {
        Self::distinct(
            map.iter()
                .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
                .collect(),
        )
    }

    /// Headers from entries whose names are already distinct (no duplicate to look for).
    fn distinct(entries: Vec<(ByteString, ByteString)>) -> Self {
        let mut headers = Self {
            entries,
            index: None,
        };
        headers.reindex();
        headers
    }

    /// Headers from `(name, value)` pairs: names lower-cased, repeated ones joined as Envoy
    /// joins them in `CheckRequest.headers` — cookies with `; `, others with `,` — so a second
    /// `authorization` makes the credential unreadable, never "the last one wins".
    pub(crate) fn joined<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut order: Vec<(String, String)> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (name, value) in pairs {
            let name = name.to_ascii_lowercase();
            match seen.get(&name) {
                Some(&i) => {
                    let joined = &mut order[i].1;
                    joined.push_str(if name == "cookie" { "; " } else { "," });
                    joined.push_str(value);
                }
                None => {
                    seen.insert(name.clone(), order.len());
                    order.push((name, value.to_owned()));
                }
            }
        }
        Self::distinct(
            order
                .into_iter()
                .map(|(k, v)| (ByteString::from(k), ByteString::from(v)))
                .collect(),
        )
    }

    /// Room for `n` more without growing.
    pub(crate) fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `name` (as stored: lower case).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|i| &*self.entries[i].1)
    }

    /// Whether `name` is present.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Every header, `(name, value)`, in the order first seen.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Every name.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|(k, _)| &**k)
    }

    /// Removes `name`.
    pub(crate) fn remove(&mut self, name: &str) {
        if let Some(i) = self.position(name) {
            self.entries.remove(i);
            self.index = None;
            self.reindex();
        }
    }

    fn position(&self, name: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(name).copied(),
            None => self.entries.iter().position(|(k, _)| &**k == name),
        }
    }

    /// Sets `name` to `value`: a map entry, as a protobuf map takes it (a repeated key's last
    /// value wins).
    fn insert(&mut self, name: ByteString, value: ByteString) {
        if let Some(i) = self.position(&name) {
            self.entries[i].1 = value;
            return;
        }
        if let Some(index) = &mut self.index {
            index.insert(name.clone(), self.entries.len());
        }
        self.entries.push((name, value));
        self.reindex();
    }

    /// Builds the index once there are more than [`SCANNED`] entries.
    fn reindex(&mut self) {
        if self.index.is_none() && self.entries.len() > SCANNED {
            self.index = Some(
                self.entries
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect(),
            );
        }
    }

    /// Merges one entry of a `map<string, string>` field exactly as prost's generated decoder
    /// merges it into a `HashMap<String, String>` (`prost::encoding::hash_map::merge`): key
    /// field 1 and value field 2, each the last one given and empty when absent, any other
    /// field skipped, each string refused when it is not UTF-8, a repeated key's last value
    /// winning; like it, whatever the field's wire type says. The strings are slices of `buf`
    /// when it holds its bytes shared (tonic's decode buffer does), copies otherwise.
    ///
    /// The shape Envoy sends ([`plain_entry`]: key and value fields only, so no group to nest)
    /// is read from the buffer's bytes at once; any other as a message through prost's own
    /// `message::merge`, which counts the entry and every group in it against prost's nesting
    /// limit as its map merge does. (The one check the one-pass reading cannot make is
    /// whether the limit was already reached before the entry: `Check` reads its headers
    /// five levels deep, where it never is.)
    pub(crate) fn merge_entry(
        &mut self,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let text = |b: Bytes| ByteString::try_from(b).map_err(|_| not_utf8());
        if let Some(plain) = plain_entry(buf.chunk()) {
            let (len, key, value) = plain?;
            let entry = buf.copy_to_bytes(len);
            self.insert(text(entry.slice(key))?, text(entry.slice(value))?);
            return Ok(());
        }
        // As a length-delimited message, whatever the wire type said: prost's nesting and
        // length checks, exactly as its map merge makes them.
        let mut entry = Entry::default();
        prost::encoding::message::merge(WireType::LengthDelimited, &mut entry, buf, ctx)?;
        self.insert(text(entry.key)?, text(entry.value)?);
        Ok(())
    }
}

/// One `map<string, string>` entry read field by field.
#[derive(Debug, Default)]
struct Entry {
    key: Bytes,
    value: Bytes,
}

impl Message for Entry {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        prost::encoding::bytes::encode(1, &self.key, buf);
        prost::encoding::bytes::encode(2, &self.value, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let string = match tag {
            1 => &mut self.key,
            2 => &mut self.value,
            _ => return skip_field(wire, tag, buf, ctx),
        };
        prost::encoding::bytes::merge(wire, string, buf, ctx)?;
        // Each string is checked as it is read, as prost checks it (a key that is not UTF-8
        // is refused even when a later one replaces it).
        std::str::from_utf8(string)
            .map(|_| ())
            .map_err(|_| not_utf8())
    }

    fn encoded_len(&self) -> usize {
        prost::encoding::bytes::encoded_len(1, &self.key)
            + prost::encoding::bytes::encoded_len(2, &self.value)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A map entry in the shape Envoy writes, read from `chunk` in one pass: its length, then
/// only key fields (`0x0a`) and value fields (`0x12`), each a length and its bytes, all within
/// `chunk`. Returns the entry's whole length (its own length prefix included) and the ranges
/// of its key and value (the last of each, as prost takes them; empty when absent), or
/// prost's error when a key or value it replaces is not UTF-8 (prost checks each string as it
/// reads it; the caller checks the last ones). `None` for anything else — another field,
/// another wire type, a tag written in more than one byte, a length past five bytes, bytes
/// beyond `chunk` — which [`Headers::merge_entry`] reads field by field, as prost does.
#[allow(clippy::type_complexity)]
fn plain_entry(chunk: &[u8]) -> Option<Result<(usize, Range<usize>, Range<usize>), DecodeError>> {
    let (len, mut at) = varint(chunk, 0)?;
    let end = at.checked_add(len)?;
    let entry = chunk.get(..end)?;
    let (mut key, mut value) = (0..0, 0..0);
    while at < end {
        let tag = entry[at];
        let (len, start) = varint(entry, at + 1)?;
        let stop = start.checked_add(len)?;
        if stop > end {
            return None;
        }
        let string = match tag {
            0x0a => &mut key,
            0x12 => &mut value,
            _ => return None,
        };
        let replaced = std::mem::replace(string, start..stop);
        if std::str::from_utf8(&entry[replaced]).is_err() {
            return Some(Err(not_utf8()));
        }
        at = stop;
    }
    Some(Ok((end, key, value)))
}

/// The varint at `bytes[at..]` (at most five bytes) and where it ends.
fn varint(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut v = 0u64;
    for i in 0..5 {
        let byte = *bytes.get(at + i)?;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((usize::try_from(v).ok()?, at + i + 1));
        }
    }
    None
}

/// prost's own error for a string that is not UTF-8 (its constructor is not public API): the
/// one its string decoder returns for the single byte 0xff.
fn not_utf8() -> DecodeError {
    let mut s = String::new();
    prost::encoding::string::merge(
        WireType::LengthDelimited,
        &mut s,
        &mut &[1u8, 0xff][..],
        DecodeContext::default(),
    )
    .expect_err("0xff is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::decode_key;

    /// A message with one `map<string, string>` field (number 3, as `HttpRequest.headers`).
    #[derive(Clone, PartialEq, Message)]
    struct WithMap {
        #[prost(map = "string, string", tag = "3")]
        headers: HashMap<String, String>,
    }

    /// Decodes `bytes` (field 3 entries only) into [`Headers`].
    fn decode(bytes: &[u8]) -> Result<Headers, DecodeError> {
        decode_from(bytes)
    }

    /// As [`decode`], from any buffer; another field number is skipped, as prost skips it.
    fn decode_from(mut buf: impl Buf) -> Result<Headers, DecodeError> {
        let mut headers = Headers::default();
        while buf.has_remaining() {
            let (tag, wire) = decode_key(&mut buf)?;
            if tag != 3 {
                skip_field(wire, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
            // prost's map merge reads the entry whatever the wire type says.
            headers.merge_entry(&mut buf, DecodeContext::default())?;
        }
        Ok(headers)
    }

    fn entry(fields: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1a];
        prost::encoding::encode_varint(fields.len() as u64, &mut out);
        out.extend_from_slice(fields);
        out
    }

    /// A key field `a`, then `depth` nested groups of field 3, then a value field `b`.
    fn nested_groups(depth: usize) -> Vec<u8> {
        let mut fields = b"\x0a\x01a".to_vec();
        fields.extend(std::iter::repeat_n(0x1b, depth));
        fields.extend(std::iter::repeat_n(0x1c, depth));
        fields.extend_from_slice(b"\x12\x01b");
        entry(&fields)
    }

    #[test]
    fn map_entries_decode_as_prost_decodes_them() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("one", entry(b"\x0a\x01a\x12\x01b")),
            ("value first", entry(b"\x12\x01b\x0a\x01a")),
            ("no value", entry(b"\x0a\x01a")),
            ("no key", entry(b"\x12\x01b")),
            ("empty entry", entry(b"")),
            ("repeated key field", entry(b"\x0a\x01a\x0a\x01c\x12\x01b")),
            ("unknown field", entry(b"\x0a\x01a\x18\x07\x12\x01b")),
            (
                "repeated key",
                [entry(b"\x0a\x01a\x12\x01b"), entry(b"\x0a\x01a\x12\x01c")].concat(),
            ),
            ("bad utf-8 key", entry(b"\x0a\x01\xff\x12\x01b")),
            ("bad utf-8 value", entry(b"\x0a\x01a\x12\x02\xc3\x28")),
            ("truncated", entry(b"\x0a\x05a")),
            ("overlong entry", vec![0x1a, 0x09, 0x0a, 0x01, b'a']),
            ("key as varint", entry(b"\x08\x01\x12\x01b")),
            ("entry as varint", vec![0x18, 0x01]),
            (
                "long value",
                entry(&[b"\x0a\x01a\x12\xc8\x01".as_slice(), &[b'v'; 200]].concat()),
            ),
            (
                "length past 32 bits",
                vec![0x1a, 0x85, 0x80, 0x80, 0x80, 0x10, 0x0a],
            ),
            ("overlong tag", entry(b"\x8a\x00\x01a\x12\x01b")),
            ("a group", nested_groups(1)),
        ];
        let mut cases = cases;
        // prost's nesting limit: a message at depth 1, the entry at 2, groups from 3 on.
        for depth in 95..=100 {
            cases.push(("nested groups", nested_groups(depth)));
        }
        let within = |depth| WithMap::decode(nested_groups(depth).as_slice()).is_ok();
        assert!(
            within(95) && !within(100),
            "the depths straddle prost's limit"
        );
        for (name, bytes) in cases {
            let ours = decode(&bytes);
            match WithMap::decode(bytes.as_slice()) {
                Ok(theirs) => {
                    let ours = ours.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(ours, Headers::from_map(&theirs.headers), "{name}");
                }
                Err(_) => assert!(ours.is_err(), "{name}: decoded {ours:?}"),
            }
        }
    }

    /// Random entries, most of them well formed, some cut or garbled, decoded from one slice
    /// (the one-pass reading where it applies) and from a buffer in two pieces (the pieces'
    /// edge sends entries across it field by field): each as prost decodes it.
    #[test]
    fn random_entries_decode_as_prost_decodes_them() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(18);
        let field = |rng: &mut StdRng, out: &mut Vec<u8>| {
            let tag: &[u8] = match rng.random_range(0..10) {
                0..=3 => &[0x0a],
                4..=7 => &[0x12],
                8 => [&[0x8a, 0x00][..], &[0x18], &[0x08], &[0x1a]][rng.random_range(0..4)],
                _ => &[0x22],
            };
            out.extend_from_slice(tag);
            let len = if rng.random_ratio(1, 10) {
                rng.random_range(100..300usize)
            } else {
                rng.random_range(0..20usize)
            };
            if len < 0x80 && rng.random_ratio(1, 10) {
                out.extend_from_slice(&[0x80 | len as u8, 0x00]);
            } else {
                prost::encoding::encode_varint(len as u64, out);
            }
            for _ in 0..len {
                out.push(if rng.random_ratio(1, 30) {
                    rng.random()
                } else {
                    rng.random_range(b'a'..=b'e')
                });
            }
        };
        let mut checked = 0;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let mut fields = Vec::new();
                for _ in 0..rng.random_range(0..4) {
                    field(&mut rng, &mut fields);
                }
                bytes.push(0x1a);
                let mut len = fields.len();
                if rng.random_ratio(1, 20) {
                    len = len.saturating_sub(1) + rng.random_range(0..3);
                }
                prost::encoding::encode_varint(len as u64, &mut bytes);
                bytes.extend_from_slice(&fields);
            }
            if rng.random_ratio(1, 20) {
                bytes.truncate(rng.random_range(0..bytes.len()));
            }
            let theirs = WithMap::decode(bytes.as_slice()).map(|m| Headers::from_map(&m.headers));
            let cut = rng.random_range(0..=bytes.len());
            let pieces = (&bytes[..cut]).chain(&bytes[cut..]);
            for ours in [decode(&bytes), decode_from(pieces)] {
                match (&theirs, ours) {
                    (Ok(theirs), Ok(ours)) => assert_eq!(&ours, theirs, "{bytes:02x?}"),
                    (Err(_), Err(_)) => {}
                    (theirs, ours) => panic!("{bytes:02x?}: prost {theirs:?}, ours {ours:?}"),
                }
            }
            checked += 1;
        }
        assert_eq!(checked, 20_000);
    }

    #[test]
    fn the_index_starts_and_ends_at_its_bound() {
        let mut headers = Headers::default();
        for i in 0..=SCANNED {
            assert_eq!(headers.index.is_some(), i > SCANNED);
            headers.insert(format!("h{i}").into(), format!("v{i}").into());
        }
        // The 33rd name built it; every name reads the same through it.
        assert!(headers.index.is_some());
        for i in 0..=SCANNED {
            assert_eq!(
                headers.get(&format!("h{i}")),
                Some(format!("v{i}").as_str())
            );
        }
        headers.insert("h3".into(), "again".into());
        assert_eq!(headers.iter().count(), SCANNED + 1);
        assert_eq!(headers.get("h3"), Some("again"));
        // Back to 32: scanned again, the same answers.
        headers.remove("h0");
        assert!(headers.index.is_none());
        assert_eq!(headers.get("h0"), None);
        assert_eq!(headers.get("h3"), Some("again"));
        assert_eq!(
            headers.get(&format!("h{SCANNED}")),
            Some(format!("v{SCANNED}").as_str())
        );
        assert_eq!(headers.iter().count(), SCANNED);
    }

    #[test]
    fn many_names_are_indexed_and_read_the_same() {
        let map: HashMap<String, String> = (0..500)
            .map(|i| (format!("x-h{i}"), format!("v{i}")))
            .collect();
        let mut bytes = WithMap {
            headers: map.clone(),
        }
        .encode_to_vec();
        // Every name again, with another value: the last wins.
        let again: HashMap<String, String> =
            map.keys().map(|k| (k.clone(), format!("{k}!"))).collect();
        bytes.extend(
            WithMap {
                headers: again.clone(),
            }
            .encode_to_vec(),
        );
        let headers = decode(&bytes).unwrap();
        assert!(headers.index.is_some());
        assert_eq!(headers.iter().count(), 500);
        for (k, v) in &again {
            assert_eq!(headers.get(k), Some(v.as_str()));
        }
        assert_eq!(headers.get("x-h500"), None);
        let mut fewer = headers.clone();
        fewer.remove("x-h7");
        assert_eq!(fewer.get("x-h7"), None);
        assert_eq!(fewer.get("x-h8"), Some("x-h8!"));
        assert_eq!(fewer.iter().count(), 499);
    }

    #[test]
    fn joined_headers_read_as_envoy_joins_them() {
        let h = Headers::joined([
            ("Cookie", "a=1"),
            ("authorization", "Bearer a"),
            ("cookie", "b=2"),
            ("Authorization", "Bearer b"),
            ("X-One", "x"),
        ]);
        assert_eq!(h.get("cookie"), Some("a=1; b=2"));
        assert_eq!(h.get("authorization"), Some("Bearer a,Bearer b"));
        assert_eq!(h.get("x-one"), Some("x"));
        assert_eq!(h.get("X-One"), None);
        assert_eq!(
            h.names().collect::<Vec<_>>(),
            ["cookie", "authorization", "x-one"]
        );
    }
}
