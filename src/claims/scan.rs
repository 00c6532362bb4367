//! A strict JSON (RFC 8259) scanner specialised for JWT payloads: it validates the whole
//! document and extracts only the members verification needs, in one pass without building a
//! tree. It accepts exactly what `serde_json` accepts (differential tests below): UTF-8 input,
//! no trailing commas, no comments, no lone surrogates, numbers within `f64` range, nesting at
//! most 128 deep.

use std::borrow::Cow;

use super::{Cat, Lenient, Payload, RawClaims, RawHeader, RawOrg, Typ};
use crate::{
    keys::Alg,
    verify::{CAT_IGNORE, CAT_M2M, CAT_SESSION},
};

const MAX_DEPTH: usize = 128;

/// The payload is not valid JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

type R<T> = Result<T, Invalid>;

struct Scanner<'a> {
    /// The input, already validated as UTF-8.
    t: &'a str,
    s: &'a [u8],
    i: usize,
}

/// Whether a string segment holds a control character (not allowed unescaped in JSON).
#[inline]
fn has_control(seg: &[u8]) -> bool {
    // Branch-free so that it vectorises.
    seg.iter().fold(false, |acc, &c| acc | (c < 0x20))
}

/// Parses a payload in one pass.
pub(crate) fn parse_payload(json: &[u8]) -> R<Payload> {
    let text = std::str::from_utf8(json).map_err(|_| Invalid)?;
    let mut sc = Scanner {
        t: text,
        s: text.as_bytes(),
        i: 0,
    };
    sc.ws();
    let payload = match sc.peek() {
        Some(b'{') => {
            sc.i += 1;
            let mut c = RawClaims::default();
            sc.object_members(0, |sc, key| sc.claim(&mut c, key))?;
            Payload(Some(c))
        }
        Some(b'n') => {
            sc.literal(b"null")?;
            Payload(None)
        }
        Some(_) => {
            sc.skip_value(0)?;
            Payload(Some(RawClaims::default()))
        }
        None => return Err(Invalid),
    };
    sc.ws();
    if sc.i != sc.s.len() {
        return Err(Invalid);
    }
    Ok(payload)
}

/// Parses a JOSE header: it must be a JSON object.
pub(crate) fn parse_header(json: &[u8]) -> R<RawHeader> {
    let text = std::str::from_utf8(json).map_err(|_| Invalid)?;
    let mut sc = Scanner {
        t: text,
        s: text.as_bytes(),
        i: 0,
    };
    sc.ws();
    sc.expect(b'{')?;
    let mut h = RawHeader::default();
    sc.object_members(0, |sc, key| {
        let v = match sc.peek() {
            Some(b'"') => {
                sc.i += 1;
                Some(sc.string_body()?)
            }
            _ => {
                sc.skip_value(1)?;
                None
            }
        };
        match key.as_ref() {
            "alg" => h.alg = v.as_deref().and_then(Alg::from_jose),
            "typ" => {
                h.typ = match v.as_deref() {
                    Some("JWT") => Typ::Jwt,
                    Some("at+jwt" | "application/at+jwt") => Typ::AccessToken,
                    _ => Typ::Other,
                }
            }
            "kid" => h.kid = v.map(Cow::into_owned),
            "cat" => {
                h.cat = match v.as_deref() {
                    Some(c) if c == CAT_SESSION || c == CAT_IGNORE => Cat::Session,
                    Some(c) if c == CAT_M2M => Cat::M2m,
                    _ => Cat::Other,
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    sc.ws();
    if sc.i != sc.s.len() {
        return Err(Invalid);
    }
    Ok(h)
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> R<()> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    fn literal(&mut self, lit: &[u8]) -> R<()> {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    /// After `{`: calls `member(self, key)` for each member, positioned after the `:` and any
    /// whitespace; `member` must consume exactly the value.
    fn object_members(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> R<()>,
    ) -> R<()> {
        if depth >= MAX_DEPTH {
            return Err(Invalid);
        }
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            self.expect(b'"')?;
            let key = self.string_body()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Invalid),
            }
        }
    }

    /// After the opening quote: the string's content, through the closing quote.
    fn string_body(&mut self) -> R<Cow<'a, str>> {
        let start = self.i;
        // Fast path: no escapes, found with SIMD.
        let n = memchr::memchr2(b'"', b'\\', &self.s[start..]).ok_or(Invalid)?;
        if has_control(&self.s[start..start + n]) {
            return Err(Invalid);
        }
        if self.s[start + n] == b'"' {
            self.i = start + n + 1;
            // Quotes are ASCII, so both ends are char boundaries of the validated input.
            return Ok(Cow::Borrowed(&self.t[start..start + n]));
        }
        self.i = start + n;
        let mut out = String::from(&self.t[start..start + n]);
        loop {
            let n = memchr::memchr2(b'"', b'\\', &self.s[self.i..]).ok_or(Invalid)?;
            let seg = &self.s[self.i..self.i + n];
            if has_control(seg) {
                return Err(Invalid);
            }
            out.push_str(&self.t[self.i..self.i + n]);
            self.i += n;
            if self.s[self.i] == b'"' {
                self.i += 1;
                return Ok(Cow::Owned(out));
            }
            // A backslash.
            self.i += 1;
            let e = self.peek().ok_or(Invalid)?;
            self.i += 1;
            match e {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => out.push(self.unicode_escape()?),
                _ => return Err(Invalid),
            }
        }
    }

    fn hex4(&mut self) -> R<u16> {
        let h = self.s.get(self.i..self.i + 4).ok_or(Invalid)?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return Err(Invalid);
        }
        let h = self.t.get(self.i..self.i + 4).ok_or(Invalid)?;
        self.i += 4;
        u16::from_str_radix(h, 16).map_err(|_| Invalid)
    }

    /// After `\u`: one code point, joining surrogate pairs; lone surrogates are invalid.
    fn unicode_escape(&mut self) -> R<char> {
        let hi = self.hex4()?;
        match hi {
            0xD800..=0xDBFF => {
                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                    return Err(Invalid);
                }
                self.i += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return Err(Invalid);
                }
                let c = 0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00);
                char::from_u32(c).ok_or(Invalid)
            }
            0xDC00..=0xDFFF => Err(Invalid),
            c => char::from_u32(u32::from(c)).ok_or(Invalid),
        }
    }

    /// A number per RFC 8259, as `f64`; out of `f64` range is invalid (as serde_json).
    fn number(&mut self) -> R<f64> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while let Some(b'0'..=b'9') = self.peek() {
                    self.i += 1;
                }
            }
            _ => return Err(Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Invalid);
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Invalid);
            }
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
        }
        let text = &self.t[start..self.i];
        // Fast path: a plain integer of at most 15 digits is exact in f64.
        if text.len() <= 15 && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse::<u64>().map(|v| v as f64).map_err(|_| Invalid);
        }
        let v: f64 = text.parse().map_err(|_| Invalid)?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(Invalid)
        }
    }

    /// Validates and skips one value.
    fn skip_value(&mut self, depth: usize) -> R<()> {
        if depth >= MAX_DEPTH {
            return Err(Invalid);
        }
        match self.peek().ok_or(Invalid)? {
            b'"' => {
                self.i += 1;
                self.skip_string()
            }
            b'{' => {
                self.i += 1;
                self.object_members(depth + 1, |sc, _| sc.skip_value(depth + 1))
            }
            b'[' => {
                self.i += 1;
                self.array_items(depth + 1, |sc| sc.skip_value(depth + 1))
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(|_| ()),
        }
    }

    fn skip_string(&mut self) -> R<()> {
        loop {
            let n = memchr::memchr2(b'"', b'\\', &self.s[self.i..]).ok_or(Invalid)?;
            if has_control(&self.s[self.i..self.i + n]) {
                return Err(Invalid);
            }
            self.i += n;
            if self.s[self.i] == b'"' {
                self.i += 1;
                return Ok(());
            }
            self.i += 1;
            match self.peek().ok_or(Invalid)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                b'u' => {
                    self.i += 1;
                    self.unicode_escape()?;
                }
                _ => return Err(Invalid),
            }
        }
    }

    /// After `[`: calls `item` for each element.
    fn array_items(&mut self, depth: usize, mut item: impl FnMut(&mut Self) -> R<()>) -> R<()> {
        if depth >= MAX_DEPTH {
            return Err(Invalid);
        }
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Invalid),
            }
        }
    }

    /// A value as [`Lenient`].
    fn lenient(&mut self, depth: usize) -> R<Lenient> {
        Ok(match self.peek().ok_or(Invalid)? {
            b'"' => {
                self.i += 1;
                Lenient::Str(self.string_body()?.into_owned())
            }
            b'n' => {
                self.literal(b"null")?;
                Lenient::Null
            }
            b'-' | b'0'..=b'9' => Lenient::Num(self.number()?),
            _ => {
                self.skip_value(depth)?;
                Lenient::Other
            }
        })
    }

    /// A value kept as a `serde_json::Value` (rare members: `aud`, `act`, `fva`…).
    fn value(&mut self, depth: usize) -> R<serde_json::Value> {
        let start = self.i;
        self.skip_value(depth)?;
        serde_json::from_slice(&self.s[start..self.i]).map_err(|_| Invalid)
    }

    fn claim(&mut self, c: &mut RawClaims, key: Cow<'a, str>) -> R<()> {
        let d = 1;
        match key.as_ref() {
            "sub" => c.sub = self.lenient(d)?,
            "sid" => c.sid = self.lenient(d)?,
            "iss" => c.iss = self.lenient(d)?,
            "azp" => c.azp = self.lenient(d)?,
            "jti" => c.jti = self.lenient(d)?,
            "sts" => c.sts = self.lenient(d)?,
            "fea" => c.fea = self.lenient(d)?,
            "pla" => c.pla = self.lenient(d)?,
            "exp" => c.exp = self.lenient(d)?,
            "nbf" => c.nbf = self.lenient(d)?,
            "iat" => c.iat = self.lenient(d)?,
            "v" => c.v = self.lenient(d)?,
            "aud" => c.aud = Some(self.value(d)?),
            "act" => c.act = Some(self.value(d)?),
            "fva" => c.fva = Some(self.value(d)?),
            "org_permissions" => c.org_permissions = Some(self.value(d)?),
            "org_id" => c.org_id = self.lenient(d)?,
            "org_slug" => c.org_slug = self.lenient(d)?,
            "org_role" => c.org_role = self.lenient(d)?,
            "o" => {
                if self.peek() == Some(b'{') {
                    self.i += 1;
                    let mut o = RawOrg::default();
                    self.object_members(d + 1, |sc, k| {
                        let v = sc.lenient(d + 1)?;
                        match k.as_ref() {
                            "id" => o.id = v,
                            "slg" => o.slg = v,
                            "rol" => o.rol = v,
                            "per" => o.per = v,
                            "fpm" => o.fpm = v,
                            _ => {}
                        }
                        Ok(())
                    })?;
                    c.o = Some(o);
                } else {
                    self.skip_value(d)?;
                    c.o = None;
                }
            }
            _ => self.skip_value(d)?,
        }
        Ok(())
    }
}
