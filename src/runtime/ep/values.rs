//! Setting values shared by the providers' settings: string enums (`string_enum!`, read from flags and config files
//! alike), byte sizes, and the serde helper that parses them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::{Error, Result};

/// An enum of string settings: parsed from the CLI (kebab or snake case) and from the config file (same), shown in
/// snake case.
macro_rules! string_enum {
    ($(#[$m:meta])* pub enum $name:ident ($what:literal) { $($(#[$vm:meta])* $var:ident = $s:literal $(| $alias:literal)*,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $var,)+ }

        impl $name {
            /// The accepted values, as the config file writes them.
            pub const NAMES: &'static [&'static str] = &[$($s),+];

            pub fn name(self) -> &'static str {
                match self { $($name::$var => $s,)+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                let k = s.trim().to_ascii_lowercase().replace(['-', ' '], "_");
                $( if k == $s $(|| k == $alias)* { return Ok($name::$var); } )+
                Err($crate::Error::input(format!("unknown {} {:?}", $what, s.trim()))
                    .with_hint(format!("use one of: {}", Self::NAMES.join(", "))))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: $crate::Error| {
                    serde::de::Error::custom($crate::runtime::ep::values::one_line(&e))
                })
            }
        }
    };
}
pub(crate) use string_enum;

/// A byte count: `8589934592`, `8GiB`, `8G`, `512MiB`, `512M`, `64KiB`, ... (K/M/G/T are powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<ByteSize> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => 0,
        };
        match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
            Some(n) if mult > 0 => Ok(ByteSize(n)),
            _ => Err(Error::input(format!("invalid byte size {t:?}")).with_hint(
                "write a number of bytes, optionally with K, M, G or T (powers of 1024), e.g. 8GiB",
            )),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

pub(crate) fn one_line(e: &Error) -> String {
    match &e.hint {
        Some(h) => format!("{} ({h})", e.message),
        None => e.message.clone(),
    }
}

/// A string or a number in the config file, parsed with the type's `FromStr`.
pub fn de_parsed<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = Error>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        S(String),
        N(i64),
    }
    let s = match StrOrNum::deserialize(d)? {
        StrOrNum::S(s) => s,
        StrOrNum::N(n) => n.to_string(),
    };
    s.parse()
        .map(Some)
        .map_err(|e: Error| serde::de::Error::custom(one_line(&e)))
}
