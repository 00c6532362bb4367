//! `JSON.parse` as V8 reads a JWT segment, for the rare payloads serde_json reads otherwise:
//! numbers beyond `f64` are ±infinity (`1e400`), strings are UTF-16 and may hold lone
//! surrogates (`"\ud800"`), nesting has no limit, and a duplicate member replaces the earlier
//! one (last wins). The grammar is RFC 8259's, which `JSON.parse` implements exactly
//! (whitespace is space, tab, LF and CR only; no BOM, comments or trailing commas).
//!
//! Parsing and dropping are iterative, so no input can exhaust the stack.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Values nested deeper than this inside a converted value become `null` in
/// [`to_serde`]'s output (serde_json's own recursion limit is 128).
pub(crate) const MAX_VALUE_DEPTH: usize = 128;

/// A JS string: UTF-16 code units, lone surrogates included.
pub(crate) type JsString = Vec<u16>;

/// A value as `JSON.parse` returns it.
#[derive(Debug, Default, PartialEq)]
pub(crate) enum JsValue {
    /// `null`.
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number (possibly ±infinity, or -0).
    Num(f64),
    /// A string.
    Str(JsString),
    /// An array.
    Arr(Vec<JsValue>),
    /// An object's own members in insertion order, duplicates already resolved (last wins,
    /// at the first one's position, as JS property order).
    Obj(Vec<(JsString, JsValue)>),
}

/// An open container while parsing.
enum Frame {
    Arr(Vec<JsValue>),
    Obj {
        members: Vec<(JsString, JsValue)>,
        index: HashMap<JsString, usize>,
        key: JsString,
    },
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

// === impl JsValue ===

impl Drop for JsValue {
    fn drop(&mut self) {
        // Iterative: a deeply nested value must not recurse once per level.
        let mut stack = Vec::new();
        take_children(self, &mut stack);
        while let Some(mut v) = stack.pop() {
            take_children(&mut v, &mut stack);
        }
    }
}

fn take_children(v: &mut JsValue, stack: &mut Vec<JsValue>) {
    match v {
        JsValue::Arr(a) if !a.is_empty() => stack.extend(std::mem::take(a)),
        JsValue::Obj(o) if !o.is_empty() => {
            stack.extend(std::mem::take(o).into_iter().map(|(_, v)| v))
        }
        _ => {}
    }
}

impl JsValue {
    /// A member of an object (`None` for a missing member or a non-object).
    pub(crate) fn get(&self, key: &str) -> Option<&JsValue> {
        match self {
            JsValue::Obj(members) => members
                .iter()
                .find(|(k, _)| k.iter().copied().eq(key.encode_utf16()))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A JS string as Rust text: each lone surrogate becomes U+FFFD.
pub(crate) fn to_string_lossy(s: &[u16]) -> String {
    String::from_utf16_lossy(s)
}

/// Parses `text` as `JSON.parse` does; `None` where it throws.
pub(crate) fn parse(text: &str) -> Option<JsValue> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.document()?;
    p.ws();
    (p.i == p.s.len()).then_some(v)
}

/// Converts to a serde_json value: numbers that are integral and within ±2^53 become
/// integers, other finite numbers floats, ±infinity `null` (as `JSON.stringify`); strings
/// lossily (lone surrogates → U+FFFD); anything nested deeper than [`MAX_VALUE_DEPTH`]
/// `null`. Duplicate keys that only differ in lone surrogates keep the last value.
pub(crate) fn to_serde(v: &JsValue) -> Value {
    to_serde_at(v, 0)
}

fn to_serde_at(v: &JsValue, depth: usize) -> Value {
    match v {
        JsValue::Null => Value::Null,
        JsValue::Bool(b) => Value::Bool(*b),
        JsValue::Num(n) => num_to_serde(*n),
        JsValue::Str(s) => Value::String(to_string_lossy(s)),
        JsValue::Arr(_) | JsValue::Obj(_) if depth >= MAX_VALUE_DEPTH => Value::Null,
        JsValue::Arr(a) => Value::Array(a.iter().map(|e| to_serde_at(e, depth + 1)).collect()),
        JsValue::Obj(o) => {
            let mut m = Map::new();
            for (k, e) in o {
                m.insert(to_string_lossy(k), to_serde_at(e, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A JS number as serde_json holds it (see [`to_serde`]).
pub(crate) fn num_to_serde(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

// === impl Parser ===

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// One value, containers handled with an explicit stack.
    fn document(&mut self) -> Option<JsValue> {
        let mut stack: Vec<Frame> = Vec::new();
        loop {
            // Parse a value start: either a scalar, or open a container.
            self.ws();
            let mut v = match self.peek()? {
                b'[' => {
                    self.i += 1;
                    if self.eat(b']') {
                        JsValue::Arr(Vec::new())
                    } else {
                        stack.push(Frame::Arr(Vec::new()));
                        continue;
                    }
                }
                b'{' => {
                    self.i += 1;
                    if self.eat(b'}') {
                        JsValue::Obj(Vec::new())
                    } else {
                        let key = self.key()?;
                        stack.push(Frame::Obj {
                            members: Vec::new(),
                            index: HashMap::new(),
                            key,
                        });
                        continue;
                    }
                }
                _ => self.scalar()?,
            };
            // Attach the value to its container; close containers as they end.
            loop {
                match stack.pop() {
                    None => return Some(v),
                    Some(Frame::Arr(mut items)) => {
                        items.push(v);
                        if self.eat(b',') {
                            stack.push(Frame::Arr(items));
                            break;
                        }
                        if !self.eat(b']') {
                            return None;
                        }
                        v = JsValue::Arr(items);
                    }
                    Some(Frame::Obj {
                        mut members,
                        mut index,
                        key,
                    }) => {
                        match index.get(&key) {
                            Some(&at) => members[at].1 = v,
                            None => {
                                index.insert(key.clone(), members.len());
                                members.push((key, v));
                            }
                        }
                        if self.eat(b',') {
                            let key = self.key()?;
                            stack.push(Frame::Obj {
                                members,
                                index,
                                key,
                            });
                            break;
                        }
                        if !self.eat(b'}') {
                            return None;
                        }
                        v = JsValue::Obj(members);
                    }
                }
            }
        }
    }

    /// `"key" :`
    fn key(&mut self) -> Option<JsString> {
        self.ws();
        if self.peek() != Some(b'"') {
            return None;
        }
        self.i += 1;
        let k = self.string()?;
        self.eat(b':').then_some(k)
    }

    fn scalar(&mut self) -> Option<JsValue> {
        let rest = &self.s[self.i..];
        for (lit, v) in [
            (&b"true"[..], JsValue::Bool(true)),
            (b"false", JsValue::Bool(false)),
            (b"null", JsValue::Null),
        ] {
            if rest.starts_with(lit) {
                self.i += lit.len();
                return Some(v);
            }
        }
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string().map(JsValue::Str)
            }
            b'-' | b'0'..=b'9' => self.number().map(JsValue::Num),
            _ => None,
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<f64> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        // Rust's parser rounds correctly and overflows to ±infinity, as JS's ToNumber.
        std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()
    }

    fn hex4(&mut self) -> Option<u16> {
        let h = self.s.get(self.i..self.i + 4)?;
        let mut v = 0u16;
        for &c in h {
            v = v << 4 | u16::try_from((c as char).to_digit(16)?).ok()?;
        }
        self.i += 4;
        Some(v)
    }

    /// After the opening quote: the string through its closing quote, as UTF-16.
    fn string(&mut self) -> Option<JsString> {
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                0..=0x1F => return None,
                b'\\' => {
                    self.i += 1;
                    let e = self.peek()?;
                    self.i += 1;
                    out.push(match e {
                        b'"' => 0x22,
                        b'\\' => 0x5C,
                        b'/' => 0x2F,
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => 0x0A,
                        b'r' => 0x0D,
                        b't' => 0x09,
                        b'u' => self.hex4()?,
                        _ => return None,
                    });
                }
                _ => {
                    // One UTF-8 character (the input is a `str`).
                    let len = match c {
                        0x00..=0x7F => 1,
                        0xC0..=0xDF => 2,
                        0xE0..=0xEF => 3,
                        _ => 4,
                    };
                    let ch = std::str::from_utf8(self.s.get(self.i..self.i + len)?)
                        .ok()?
                        .chars()
                        .next()?;
                    let mut buf = [0u16; 2];
                    out.extend_from_slice(ch.encode_utf16(&mut buf));
                    self.i += len;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> JsValue {
        JsValue::Str(x.encode_utf16().collect())
    }

    #[test]
    fn reads_as_json_parse() {
        assert_eq!(parse("1e400"), Some(JsValue::Num(f64::INFINITY)));
        assert_eq!(parse("-1e400"), Some(JsValue::Num(f64::NEG_INFINITY)));
        assert!(matches!(parse("-0"), Some(JsValue::Num(z)) if z == 0.0 && z.is_sign_negative()));
        assert_eq!(parse("1E2"), Some(JsValue::Num(100.0)));
        assert_eq!(
            parse("12345678901234567890"),
            Some(JsValue::Num(12345678901234567890.0))
        );
        assert_eq!(parse(r#""\ud800""#), Some(JsValue::Str(vec![0xD800])));
        assert_eq!(
            parse(r#"{"a":1,"b":2,"a":3}"#),
            Some(JsValue::Obj(vec![
                ("a".encode_utf16().collect(), JsValue::Num(3.0)),
                ("b".encode_utf16().collect(), JsValue::Num(2.0)),
            ]))
        );
        assert_eq!(
            parse(r#"" \u00e9\ud83d\ude00""#),
            Some(s(" \u{e9}\u{1F600}"))
        );
        for bad in [
            "",
            "\u{feff}{}",
            "{,}",
            "[1,]",
            "01",
            "1.",
            ".5",
            "+1",
            "\"\t\"",
            "\"\\x\"",
            "nul",
            "{} x",
            "\u{a0}1",
            "[",
            "{\"a\"}",
            "{\"a\":1,}",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deep_nesting_neither_fails_nor_overflows() {
        let depth = 100_000;
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let v = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let v = parse(&text).expect("deep arrays are JSON");
                let serde = to_serde(&v);
                drop(v);
                serde
            })
            .unwrap()
            .join()
            .unwrap();
        // Converted values stop at MAX_VALUE_DEPTH.
        let mut d = 0;
        let mut cur = &v;
        while let Value::Array(a) = cur {
            d += 1;
            cur = &a[0];
        }
        assert_eq!((d, cur), (MAX_VALUE_DEPTH, &Value::Null));
    }

    #[test]
    fn to_serde_maps_what_utf8_and_serde_cannot_hold() {
        let v = parse(r#"{"a":1e400,"b":"x\ud800y","c":[1,1.5,-0]}"#).unwrap();
        assert_eq!(
            to_serde(&v),
            serde_json::json!({"a": null, "b": "x\u{FFFD}y", "c": [1, 1.5, 0]})
        );
    }
}
