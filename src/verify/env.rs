//! The typed readers of settings by name, shared by [`super::settings::VerifierSettings`]
//! and the server's configuration (`server::config`), so that every variable is parsed by one
//! function with one set of rules: unset and blank are the same (the default), values are
//! trimmed, and a bad value is one [`SettingError`] naming the variable, never showing the
//! value (it may be a secret).

// Some readers are used only by the server's configuration.
#![cfg_attr(not(feature = "server"), allow(dead_code))]

use std::{net::SocketAddr, time::Duration};

use super::settings::SettingError;

/// The error of `var`.
pub(crate) fn err(var: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError {
        var,
        problem: problem.into(),
    }
}

type Source<'a> = dyn Fn(&'static str) -> Result<Option<String>, SettingError> + 'a;

/// Settings by name, one small typed reader per kind of value. Unset and blank are the same.
pub(crate) struct Env<'a>(Box<Source<'a>>);

impl<'a> Env<'a> {
    /// Values from `lookup` (a variable's value, `None` when unset).
    pub(crate) fn lookup(lookup: impl Fn(&str) -> Option<String> + 'a) -> Self {
        Self(Box::new(move |var| Ok(lookup(var))))
    }

    /// Values from the process environment; one that is not UTF-8 is an error naming it.
    pub(crate) fn process() -> Self {
        Self(Box::new(|var| match std::env::var(var) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(err(var, "not valid UTF-8")),
        }))
    }

    /// The trimmed value, `None` when unset or blank.
    pub(crate) fn text(&self, var: &'static str) -> Result<Option<String>, SettingError> {
        Ok((self.0)(var)?
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()))
    }

    /// A comma-separated list; blank entries are skipped.
    pub(crate) fn list(&self, var: &'static str) -> Result<Vec<String>, SettingError> {
        Ok(self
            .text(var)?
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `true` or `false`, exactly (unset: `false`).
    pub(crate) fn flag(&self, var: &'static str) -> Result<bool, SettingError> {
        match self.text(var)?.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(err(var, "neither true nor false")),
        }
    }

    /// `true`/`1` or `false`/`0`, in any case (unset: `default`).
    pub(crate) fn switch(&self, var: &'static str, default: bool) -> Result<bool, SettingError> {
        match self.text(var)?.map(|s| s.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(_) => Err(err(var, "neither true nor false")),
        }
    }

    /// A whole number from 0 to `max` (unset: `default`).
    pub(crate) fn num(
        &self,
        var: &'static str,
        default: u64,
        max: u64,
    ) -> Result<u64, SettingError> {
        let Some(s) = self.text(var)? else {
            return Ok(default);
        };
        let n: u64 = s
            .parse()
            .map_err(|_| err(var, "not a non-negative whole number"))?;
        if n > max {
            return Err(err(var, format!("larger than the maximum {max}")));
        }
        Ok(n)
    }

    /// A whole number from 1 to `max` (unset: `default`).
    pub(crate) fn positive(
        &self,
        var: &'static str,
        default: u64,
        max: u64,
    ) -> Result<u64, SettingError> {
        match self.num(var, default, max)? {
            0 => Err(err(var, "must be at least 1")),
            n => Ok(n),
        }
    }

    /// Whole seconds from 0 to `max_secs` (unset: `default`).
    pub(crate) fn secs(
        &self,
        var: &'static str,
        default: Duration,
        max_secs: u64,
    ) -> Result<Duration, SettingError> {
        self.num(var, default.as_secs(), max_secs)
            .map(Duration::from_secs)
    }

    /// A socket address such as `example` (unset: `None`).
    pub(crate) fn addr(
        &self,
        var: &'static str,
        example: &str,
    ) -> Result<Option<SocketAddr>, SettingError> {
        self.text(var)?
            .map(|a| {
                a.parse()
                    .map_err(|_| err(var, format!("not an address like {example}")))
            })
            .transpose()
    }

    /// An http(s) URL with a host (unset: `None`).
    pub(crate) fn url(&self, var: &'static str) -> Result<Option<url::Url>, SettingError> {
        self.text(var)?.map(|s| parse_url(var, &s)).transpose()
    }
}

/// `s` as an http(s) URL with a host; the error names `var`, not the value.
pub(crate) fn parse_url(var: &'static str, s: &str) -> Result<url::Url, SettingError> {
    let u = url::Url::parse(s).map_err(|e| err(var, format!("not a valid URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(err(var, "must be an http(s) URL with a host"));
    }
    Ok(u)
}
