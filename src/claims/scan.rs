//! A strict JSON (RFC 8259) scanner specialised for JWT payloads: it validates the whole
//! document and extracts only the members verification needs, in one pass without building a
//! tree. It accepts exactly what `serde_json` accepts (differential tests below): UTF-8 input,
//! no trailing commas, no comments, no lone surrogates, numbers within `f64` range, nesting at
//! most 128 deep.

use std::borrow::Cow;

use super::{Cat, Lenient, Payload, RawClaims, RawHeader, RawOrg, Typ};
use crate::{
    keys::Alg,
    verify::{CAT_IGNORE, CAT_SESSION},
};

const MAX_DEPTH: usize = 128;

/// The payload is not valid JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

type R<T> = Result<T, Invalid>;

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

/// Parses a payload in one pass.
pub(crate) fn parse_payload(json: &[u8]) -> R<Payload> {
    let text = std::str::from_utf8(json).map_err(|_| Invalid)?;
    let mut sc = Scanner {
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
        // Fast path: no escapes.
        loop {
            match self.peek() {
                None => return Err(Invalid),
                Some(b'"') => {
                    let s = &self.s[start..self.i];
                    self.i += 1;
                    // The input is valid UTF-8 and quotes/backslashes are ASCII, so this slice
                    // is too.
                    return std::str::from_utf8(s)
                        .map(Cow::Borrowed)
                        .map_err(|_| Invalid);
                }
                Some(b'\\') => break,
                Some(c) if c < 0x20 => return Err(Invalid),
                Some(_) => self.i += 1,
            }
        }
        let mut out: Vec<u8> = self.s[start..self.i].to_vec();
        loop {
            match self.peek() {
                None => return Err(Invalid),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map(Cow::Owned).map_err(|_| Invalid);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let e = self.peek().ok_or(Invalid)?;
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(Invalid),
                    }
                }
                Some(c) if c < 0x20 => return Err(Invalid),
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn hex4(&mut self) -> R<u16> {
        let h = self.s.get(self.i..self.i + 4).ok_or(Invalid)?;
        let h = std::str::from_utf8(h).map_err(|_| Invalid)?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Invalid);
        }
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
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| Invalid)?;
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
            match self.peek() {
                None => return Err(Invalid),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
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
                Some(c) if c < 0x20 => return Err(Invalid),
                Some(_) => self.i += 1,
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
