//! A strict JSON (RFC 8259) scanner specialised for JWT payloads: it validates the whole
//! document and extracts only the members verification needs, in one pass without building a
//! tree. It accepts exactly what `JSON.parse` accepts (differential tests against the
//! JS-faithful reference, `reference.rs`): no trailing commas, no comments, no BOM (the
//! caller strips one, as `TextDecoder`). As in JS, a number beyond `f64` is ±infinity, a lone
//! surrogate escape is kept (as U+FFFD: a Rust string cannot hold it), and nesting has no
//! limit (skipping is iterative: one bit per open container).

use std::borrow::Cow;

use super::{Cat, Lenient, Payload, RawClaims, RawHeader, RawOrg, Typ};
use crate::token::{
    check::{CAT_IGNORE, CAT_M2M, CAT_SESSION},
    keys::Alg,
};

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

/// The containers a skip is inside: one bit per level (1 = object), 64 levels inline and
/// the rest spilled (only for absurd nesting).
struct Levels {
    inline: u64,
    spill: Vec<u64>,
    depth: usize,
}

/// Parses a payload in one pass.
pub(crate) fn parse_payload(text: &str) -> R<Payload> {
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
            sc.object_members(|sc, key| sc.claim(&mut c, key))?;
            Payload(Some(c))
        }
        Some(b'n') => {
            sc.literal(b"null")?;
            Payload(None)
        }
        Some(_) => {
            sc.skip_value()?;
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
pub(crate) fn parse_header(text: &str) -> R<RawHeader> {
    let mut sc = Scanner {
        t: text,
        s: text.as_bytes(),
        i: 0,
    };
    sc.ws();
    sc.expect(b'{')?;
    let mut h = RawHeader::default();
    sc.object_members(|sc, key| {
        let v = match sc.peek() {
            Some(b'"') => {
                sc.i += 1;
                Some(sc.string_body()?)
            }
            _ => {
                sc.skip_value()?;
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
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> R<()>,
    ) -> R<()> {
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

    /// After `\u`: one code point, joining surrogate pairs. A lone surrogate (kept by
    /// `JSON.parse`) becomes U+FFFD; the escape after a lone high surrogate is read anew.
    fn unicode_escape(&mut self) -> R<char> {
        let hi = self.hex4()?;
        match hi {
            0xD800..=0xDBFF => {
                if self.s.get(self.i..self.i + 2) == Some(b"\\u") {
                    let at = self.i;
                    self.i += 2;
                    if let Ok(lo @ 0xDC00..=0xDFFF) = self.hex4() {
                        let c =
                            0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00);
                        return char::from_u32(c).ok_or(Invalid);
                    }
                    self.i = at;
                }
                Ok(char::REPLACEMENT_CHARACTER)
            }
            0xDC00..=0xDFFF => Ok(char::REPLACEMENT_CHARACTER),
            c => char::from_u32(u32::from(c)).ok_or(Invalid),
        }
    }

    /// A number per RFC 8259, as `f64`; beyond `f64` range it is ±infinity (as `JSON.parse`).
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
        text.parse().map_err(|_| Invalid)
    }

    /// Validates and skips one value, iteratively (no recursion, so no nesting limit). Kept
    /// out of line: real tokens skip little, and inlining it bloats the hot member loop.
    #[inline(never)]
    fn skip_value(&mut self) -> R<()> {
        let mut open = Levels {
            inline: 0,
            spill: Vec::new(),
            depth: 0,
        };
        'value: loop {
            match self.peek().ok_or(Invalid)? {
                b'"' => {
                    self.i += 1;
                    self.skip_string()?;
                }
                b'{' => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        open.push(true);
                        self.member_key()?;
                        continue 'value;
                    }
                }
                b'[' => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        open.push(false);
                        continue 'value;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => {
                    self.number()?;
                }
            }
            // A value ended: continue or close its containers.
            loop {
                let Some(object) = open.top() else {
                    return Ok(());
                };
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if object {
                            self.member_key()?;
                        } else {
                            self.ws();
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => self.i += 1,
                    Some(b']') if !object => self.i += 1,
                    _ => return Err(Invalid),
                }
                open.depth -= 1;
            }
        }
    }

    /// Inside an object, at a member: `"key" :` and the whitespace after it.
    fn member_key(&mut self) -> R<()> {
        self.ws();
        self.expect(b'"')?;
        self.skip_string()?;
        self.ws();
        self.expect(b':')?;
        self.ws();
        Ok(())
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

    /// A value as [`Lenient`].
    fn lenient(&mut self) -> R<Lenient> {
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
            b't' => {
                self.literal(b"true")?;
                Lenient::Bool(true)
            }
            b'f' => {
                self.literal(b"false")?;
                Lenient::Bool(false)
            }
            _ => {
                self.skip_value()?;
                Lenient::Other
            }
        })
    }

    /// A value kept as a `serde_json::Value` (rare members: `aud`, `act`, `fva`…): through
    /// serde_json when it reads it as `JSON.parse` does, otherwise as [`super::js`] maps it.
    fn value(&mut self) -> R<serde_json::Value> {
        let start = self.i;
        self.skip_value()?;
        let text = &self.t[start..self.i];
        serde_json::from_str(text)
            .ok()
            .or_else(|| super::js::parse(text).map(|v| super::js::to_serde(&v)))
            .ok_or(Invalid)
    }

    fn claim(&mut self, c: &mut RawClaims, key: Cow<'a, str>) -> R<()> {
        match key.as_ref() {
            "sub" => c.sub = self.lenient()?,
            "sid" => c.sid = self.lenient()?,
            "iss" => c.iss = self.lenient()?,
            "azp" => c.azp = self.lenient()?,
            "jti" => c.jti = self.lenient()?,
            "sts" => c.sts = self.lenient()?,
            "fea" => c.fea = self.lenient()?,
            "pla" => c.pla = self.lenient()?,
            "exp" => c.exp = self.lenient()?,
            "nbf" => c.nbf = self.lenient()?,
            "iat" => c.iat = self.lenient()?,
            "v" => c.v = self.lenient()?,
            "aud" => c.aud = Some(self.value()?),
            "act" => c.act = Some(self.value()?),
            "fva" => c.fva = Some(self.value()?),
            "org_permissions" => c.org_permissions = Some(self.value()?),
            "org_id" => c.org_id = self.lenient()?,
            "org_slug" => c.org_slug = self.lenient()?,
            "org_role" => c.org_role = self.lenient()?,
            "o" => {
                if self.peek() == Some(b'{') {
                    self.i += 1;
                    let mut o = RawOrg::default();
                    self.object_members(|sc, k| {
                        let v = sc.lenient()?;
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
                    c.o_truthy = true;
                } else {
                    c.o_truthy = self.lenient()?.truthy();
                    c.o = None;
                }
            }
            _ => self.skip_value()?,
        }
        Ok(())
    }
}

// === impl Levels ===

impl Levels {
    #[inline]
    fn push(&mut self, object: bool) {
        let d = self.depth;
        let word = if d < 64 {
            &mut self.inline
        } else {
            let w = (d - 64) / 64;
            if w == self.spill.len() {
                self.spill.push(0);
            }
            &mut self.spill[w]
        };
        let bit = 1u64 << (d % 64);
        if object {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        self.depth += 1;
    }

    /// Whether the innermost open container is an object; `None` when none is open.
    #[inline]
    fn top(&self) -> Option<bool> {
        let d = self.depth.checked_sub(1)?;
        let word = if d < 64 {
            self.inline
        } else {
            self.spill[(d - 64) / 64]
        };
        Some(word >> (d % 64) & 1 == 1)
    }
}
