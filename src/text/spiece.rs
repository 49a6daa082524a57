//! SentencePiece models (`spiece.model`, as google/t5-v1_1-xxl ships its tokenizer) read natively, and T5's
//! tokenizer built from one exactly as transformers 5's `T5Tokenizer` builds it.
//!
//! A spiece.model is a serialized `sentencepiece.ModelProto` (sentencepiece's `sentencepiece_model.proto`, proto2).
//! The fields read here, by number:
//!
//! - `ModelProto`: 1 `pieces` (repeated `SentencePiece`), 2 `trainer_spec`, 3 `normalizer_spec`;
//! - `SentencePiece`: 1 `piece` string, 2 `score` float, 3 `type` enum (NORMAL 1 by default, UNKNOWN 2,
//!   CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6);
//! - `TrainerSpec`: 3 `model_type` (UNIGRAM 1 by default, BPE 2, WORD 3, CHAR 4), 4 `vocab_size`,
//!   35 `byte_fallback`, 40 `unk_id` (0), 41 `bos_id` (1), 42 `eos_id` (2), 43 `pad_id` (-1);
//! - `NormalizerSpec`: 1 `name`, 2 `precompiled_charsmap` bytes, 3 `add_dummy_prefix`,
//!   4 `remove_extra_whitespaces`, 5 `escape_whitespaces` (all three true by default).
//!
//! Other fields (self-test data, the denormalizer, training options) are skipped, as protobuf skips unknown fields.
//! A truncated or garbled file is a [`SpieceError`], never a panic.
//!
//! transformers 5 (`TokenizersBackend._convert_from_sentencepiece`, `T5Converter.convert_from_spm`,
//! `T5Tokenizer.__init__`) keeps only the pieces with their scores and the precompiled charsmap: the Unigram model
//! gets every piece, then `<extra_id_{n-1}>` … `<extra_id_0>` with score 0 (`extra_ids` in tokenizer_config.json,
//! 100 by default), unk id 2 and no byte fallback; the normalizer is the charsmap alone (none when the model has
//! none); the pre-tokenizer `WhitespaceSplit` + `Metaspace("▁", prepend_scheme="always", split=True)`, the decoder
//! the same `Metaspace`. The normalizer spec's flags (dummy prefix, whitespace handling) are not read: the
//! pre-tokenizer does that work. [`t5_tokenizer`] builds exactly that; the added tokens and the `$A </s>`
//! post-processor, which depend on tokenizer_config.json, are the caller's (`text::PromptTokenizer`).

use std::collections::{HashMap, HashSet};
use std::fmt;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

/// The unknown-token id transformers' `T5Tokenizer` gives its Unigram model, whatever the file says.
pub const T5_UNK_ID: usize = 2;
/// `extra_ids` when tokenizer_config.json does not say (transformers' default).
pub const DEFAULT_EXTRA_IDS: usize = 100;
/// Metaspace's replacement for a space.
const SPACE: char = '\u{2581}';
/// The longest key spm_precompiled looks up in a charsmap: a grapheme of under 6 bytes, else one char.
const MAX_CHARSMAP_KEY: usize = 5;

/// What is wrong with a spiece.model (the caller names the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpieceError(pub String);

impl fmt::Display for SpieceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpieceError {}

type Res<T> = std::result::Result<T, SpieceError>;

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(SpieceError(msg.into()))
}

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    /// The enum value; `None` for a value the proto does not define (protobuf then leaves the field unset).
    fn from_proto(v: u64) -> Option<PieceKind> {
        Some(match v {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => return None,
        })
    }
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

impl ModelType {
    fn from_proto(v: u64) -> Option<ModelType> {
        Some(match v {
            1 => ModelType::Unigram,
            2 => ModelType::Bpe,
            3 => ModelType::Word,
            4 => ModelType::Char,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelType::Unigram => "Unigram",
            ModelType::Bpe => "BPE",
            ModelType::Word => "word",
            ModelType::Char => "char",
        }
    }
}

/// One `SentencePiece`.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceKind,
}

impl Default for Piece {
    fn default() -> Self {
        Piece {
            piece: String::new(),
            score: 0.0,
            kind: PieceKind::Normal,
        }
    }
}

/// The `TrainerSpec` fields that decide how a model tokenizes (proto defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    pub vocab_size: i32,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: ModelType::Unigram,
            vocab_size: 8000,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
        }
    }
}

/// `NormalizerSpec` (proto defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed spiece.model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpieceModel {
    pub pieces: Vec<Piece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

// ---- protobuf wire format ----

/// One field's value as the wire carries it.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

impl Wire<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Wire::Varint(_) => "a varint",
            Wire::Fixed64 => "a 64-bit value",
            Wire::Bytes(_) => "length-delimited bytes",
            Wire::Fixed32(_) => "a 32-bit value",
        }
    }
}

/// A field: its number, where its value starts in the file, and the value.
struct Field<'a> {
    number: u64,
    at: usize,
    wire: Wire<'a>,
}

impl<'a> Field<'a> {
    fn mismatch<T>(&self, message: &str, name: &str, want: &str) -> Res<T> {
        err(format!(
            "{message}.{name} (field {}) at byte {} is {}, not {want}",
            self.number,
            self.at,
            self.wire.type_name()
        ))
    }

    fn bytes(&self, message: &str, name: &str) -> Res<&'a [u8]> {
        match self.wire {
            Wire::Bytes(b) => Ok(b),
            _ => self.mismatch(message, name, "length-delimited bytes"),
        }
    }

    fn string(&self, message: &str, name: &str) -> Res<String> {
        let bytes = self.bytes(message, name)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => err(format!(
                "{message}.{name} at byte {} is not UTF-8: {e}",
                self.at
            )),
        }
    }

    fn varint(&self, message: &str, name: &str) -> Res<u64> {
        match self.wire {
            Wire::Varint(v) => Ok(v),
            _ => self.mismatch(message, name, "a varint"),
        }
    }

    /// An `int32`: protobuf writes negative values as 10-byte varints and keeps the low 32 bits.
    fn int32(&self, message: &str, name: &str) -> Res<i32> {
        Ok(self.varint(message, name)? as u32 as i32)
    }

    fn boolean(&self, message: &str, name: &str) -> Res<bool> {
        Ok(self.varint(message, name)? != 0)
    }

    fn float(&self, message: &str, name: &str) -> Res<f32> {
        match self.wire {
            Wire::Fixed32(b) => Ok(f32::from_le_bytes(b)),
            _ => self.mismatch(message, name, "a 32-bit float"),
        }
    }
}

/// Reads the fields of one message; `base` is where the message starts in the file (for error offsets).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, message: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            base,
            message,
        }
    }

    fn truncated<T>(&self, what: &str) -> Res<T> {
        err(format!(
            "the file is truncated or corrupt: {what} in {} runs past its end (byte {})",
            self.message,
            self.base + self.buf.len()
        ))
    }

    fn varint(&mut self, what: &str) -> Res<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf.get(self.pos) else {
                return self.truncated(what);
            };
            self.pos += 1;
            if i == 9 && byte > 1 {
                return err(format!(
                    "{what} at byte {} of {} is longer than 64 bits",
                    self.base + self.pos - 10,
                    self.message
                ));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        err("unreachable: a varint has at most 10 bytes")
    }

    fn take(&mut self, n: usize, what: &str) -> Res<&'a [u8]> {
        match self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => self.truncated(what),
        }
    }

    /// The next field, or `None` at the end of the message.
    fn field(&mut self) -> Res<Option<Field<'a>>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let start = self.base + self.pos;
        let key = self.varint("a field tag")?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return err(format!(
                "the file is corrupt: invalid field number {number} at byte {start} of {}",
                self.message
            ));
        }
        let what = format!("field {number}");
        let at = self.base + self.pos;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint(&what)?),
            1 => {
                self.take(8, &what)?;
                Wire::Fixed64
            }
            2 => {
                let len = self.varint(&what)?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let at = self.base + self.pos;
                let bytes = self.take(len, &format!("{what} ({len} bytes)"))?;
                return Ok(Some(Field {
                    number,
                    at,
                    wire: Wire::Bytes(bytes),
                }));
            }
            5 => {
                let b = self.take(4, &what)?;
                Wire::Fixed32([b[0], b[1], b[2], b[3]])
            }
            t => {
                return err(format!(
                    "the file is corrupt: field {number} at byte {start} of {} has wire type {t}, which a \
                     SentencePiece model does not use",
                    self.message
                ))
            }
        };
        Ok(Some(Field { number, at, wire }))
    }
}

fn parse_piece(buf: &[u8], base: usize) -> Res<Piece> {
    const M: &str = "SentencePiece";
    let mut piece = Piece::default();
    let mut r = Reader::new(buf, base, "a SentencePiece");
    while let Some(f) = r.field()? {
        match f.number {
            1 => piece.piece = f.string(M, "piece")?,
            2 => piece.score = f.float(M, "score")?,
            3 => {
                if let Some(kind) = PieceKind::from_proto(f.varint(M, "type")?) {
                    piece.kind = kind;
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(spec: &mut TrainerSpec, buf: &[u8], base: usize) -> Res<()> {
    const M: &str = "TrainerSpec";
    let mut r = Reader::new(buf, base, "the TrainerSpec");
    while let Some(f) = r.field()? {
        match f.number {
            3 => {
                if let Some(t) = ModelType::from_proto(f.varint(M, "model_type")?) {
                    spec.model_type = t;
                }
            }
            4 => spec.vocab_size = f.int32(M, "vocab_size")?,
            35 => spec.byte_fallback = f.boolean(M, "byte_fallback")?,
            40 => spec.unk_id = f.int32(M, "unk_id")?,
            41 => spec.bos_id = f.int32(M, "bos_id")?,
            42 => spec.eos_id = f.int32(M, "eos_id")?,
            43 => spec.pad_id = f.int32(M, "pad_id")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(spec: &mut NormalizerSpec, buf: &[u8], base: usize) -> Res<()> {
    const M: &str = "NormalizerSpec";
    let mut r = Reader::new(buf, base, "the NormalizerSpec");
    while let Some(f) = r.field()? {
        match f.number {
            1 => spec.name = f.string(M, "name")?,
            2 => spec.precompiled_charsmap = f.bytes(M, "precompiled_charsmap")?.to_vec(),
            3 => spec.add_dummy_prefix = f.boolean(M, "add_dummy_prefix")?,
            4 => spec.remove_extra_whitespaces = f.boolean(M, "remove_extra_whitespaces")?,
            5 => spec.escape_whitespaces = f.boolean(M, "escape_whitespaces")?,
            _ => {}
        }
    }
    Ok(())
}

/// Parses a spiece.model. Besides the wire format it checks what sentencepiece itself requires of the pieces:
/// at least one, none empty, none twice.
pub fn parse(bytes: &[u8]) -> Res<SpieceModel> {
    const M: &str = "ModelProto";
    if bytes.is_empty() {
        return err("the file is empty");
    }
    let mut model = SpieceModel::default();
    let mut r = Reader::new(bytes, 0, "the ModelProto");
    while let Some(f) = r.field()? {
        match f.number {
            1 => model.pieces.push(parse_piece(f.bytes(M, "pieces")?, f.at)?),
            // A message field given twice is merged, as protobuf merges it.
            2 => parse_trainer(&mut model.trainer, f.bytes(M, "trainer_spec")?, f.at)?,
            3 => parse_normalizer(&mut model.normalizer, f.bytes(M, "normalizer_spec")?, f.at)?,
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        return err("it has no pieces: not a SentencePiece model");
    }
    let mut seen = HashSet::with_capacity(model.pieces.len());
    for (id, p) in model.pieces.iter().enumerate() {
        if p.piece.is_empty() {
            return err(format!("piece {id} is empty"));
        }
        if !seen.insert(p.piece.as_str()) {
            return err(format!("piece {id} ({:?}) is there twice", p.piece));
        }
    }
    Ok(model)
}

/// Checks a precompiled charsmap the way `spm_precompiled` reads it (a little-endian u32 trie size in bytes, the
/// double-array trie's u32 units, then NUL-separated UTF-8 replacements), walking every path a lookup can take so
/// that no input can index outside the trie or the replacements (which would panic at encode time).
pub fn check_charsmap(blob: &[u8]) -> Res<()> {
    let bad = |msg: String| err(format!("its precompiled_charsmap is corrupt: {msg}"));
    let Some((head, rest)) = blob.split_first_chunk::<4>() else {
        return bad(format!("{} bytes", blob.len()));
    };
    let trie_bytes = u32::from_le_bytes(*head) as usize;
    let n_units = trie_bytes / 4;
    if n_units == 0 || rest.len() < n_units * 4 {
        return bad(format!(
            "a trie of {trie_bytes} bytes in {} bytes",
            rest.len()
        ));
    }
    let units: Vec<usize> = rest[..n_units * 4]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let normalized = match std::str::from_utf8(&rest[n_units * 4..]) {
        Ok(s) => s,
        Err(e) => return bad(format!("its replacements are not UTF-8: {e}")),
    };
    // spm_precompiled's `ArrayUnit` accessors.
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let label = |u: usize| u & ((1 << 31) | 0xff);
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let value = |u: usize| u & ((1 << 31) - 1);

    // Depth-first over (node, bytes consumed); a node already walked with at least as many bytes left is skipped.
    let mut shallowest: HashMap<usize, usize> = HashMap::new();
    let mut stack = vec![(offset(units[0]), 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth == MAX_CHARSMAP_KEY || shallowest.get(&node).is_some_and(|&d| d <= depth) {
            continue;
        }
        shallowest.insert(node, depth);
        for c in 1..=255usize {
            let Some(&unit) = units.get(node ^ c) else {
                return bad(format!("byte {c:#04x} leads outside the trie"));
            };
            if label(unit) != c {
                continue;
            }
            let next = node ^ c ^ offset(unit);
            if has_leaf(unit) {
                let Some(&leaf) = units.get(next) else {
                    return bad("a leaf lies outside the trie".into());
                };
                let at = value(leaf);
                if !normalized.is_char_boundary(at) {
                    return bad(format!(
                        "a replacement starts at byte {at} of {}",
                        normalized.len()
                    ));
                }
            }
            stack.push((next, depth + 1));
        }
    }
    Ok(())
}

/// Builds T5's tokenizer from `model` as transformers 5 builds it from spiece.model (see the module docs):
/// Unigram over the pieces and `extra_ids` sentinels, the charsmap normalizer, WhitespaceSplit + Metaspace.
/// Without added tokens or post-processor. The model must be a Unigram model laid out like T5's (unknown
/// piece at id 2, which transformers assumes).
pub fn t5_tokenizer(model: &SpieceModel, extra_ids: usize) -> Res<Tokenizer> {
    let t = &model.trainer;
    if t.model_type != ModelType::Unigram {
        return err(format!(
            "it is a {} SentencePiece model; T5's is Unigram",
            t.model_type.name()
        ));
    }
    let unk_ok = usize::try_from(t.unk_id).is_ok_and(|id| id == T5_UNK_ID)
        && model
            .pieces
            .get(T5_UNK_ID)
            .is_some_and(|p| p.kind == PieceKind::Unknown);
    if !unk_ok {
        return err(format!(
            "its unknown piece is not id {T5_UNK_ID} (unk_id {}, piece {T5_UNK_ID} {:?}): not a T5 model \
             (<pad> 0, </s> 1, <unk> 2), which transformers' T5Tokenizer assumes",
            t.unk_id,
            model.pieces.get(T5_UNK_ID).map(|p| p.piece.as_str())
        ));
    }
    let mut vocab: Vec<(String, f64)> = Vec::with_capacity(model.pieces.len() + extra_ids);
    vocab.extend(
        model
            .pieces
            .iter()
            .map(|p| (p.piece.clone(), f64::from(p.score))),
    );
    vocab.extend(
        (0..extra_ids)
            .rev()
            .map(|i| (format!("<extra_id_{i}>"), 0.0)),
    );
    let unigram = Unigram::from(vocab, Some(T5_UNK_ID), false)
        .map_err(|e| SpieceError(format!("its pieces do not make a Unigram model: {e}")))?;
    let mut tokenizer = Tokenizer::new(unigram);
    let charsmap = &model.normalizer.precompiled_charsmap;
    if !charsmap.is_empty() {
        check_charsmap(charsmap)?;
        let precompiled = Precompiled::from(charsmap)
            .map_err(|e| SpieceError(format!("its precompiled_charsmap is corrupt: {e}")))?;
        tokenizer
            .with_normalizer(Some(precompiled))
            .map_err(|e| SpieceError(format!("its normalizer: {e}")))?;
    }
    let metaspace = Metaspace::new(SPACE, PrependScheme::Always, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        WhitespaceSplit.into(),
        metaspace.clone().into(),
    ])));
    tokenizer.with_decoder(Some(DecoderWrapper::Metaspace(metaspace)));
    Ok(tokenizer)
}

/// The added tokens transformers' extractor takes from the model when tokenizer_config.json lists none: the
/// CONTROL pieces (special) and the USER_DEFINED ones (not special), by id, matched on the raw text.
pub fn added_pieces(model: &SpieceModel) -> Vec<AddedToken> {
    model
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceKind::Control | PieceKind::UserDefined))
        .map(|p| AddedToken::from(p.piece.as_str(), p.kind == PieceKind::Control).normalized(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- a tiny protobuf writer for hand-made models ----

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn tag(number: u64, wire: u64, out: &mut Vec<u8>) {
        varint(number << 3 | wire, out);
    }

    fn bytes_field(number: u64, data: &[u8], out: &mut Vec<u8>) {
        tag(number, 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn int_field(number: u64, v: i64, out: &mut Vec<u8>) {
        tag(number, 0, out);
        varint(v as u64, out);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        bytes_field(1, text.as_bytes(), &mut p);
        tag(2, 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        int_field(3, kind as i64, &mut p);
        p
    }

    /// A T5-shaped model: <pad> </s> <unk> ▁ ▁cat ▁dog c a t d o g, no charsmap.
    fn tiny_model(model_type: i64, charsmap: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        let pieces = [
            ("<pad>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<unk>", 0.0, 2),
            ("\u{2581}", -2.0, 1),
            ("\u{2581}cat", -1.0, 1),
            ("\u{2581}dog", -1.0, 1),
            ("c", -5.0, 1),
            ("a", -5.0, 1),
            ("t", -5.0, 1),
            ("d", -5.0, 1),
            ("o", -5.0, 1),
            ("g", -5.0, 1),
        ];
        for (text, score, kind) in pieces {
            bytes_field(1, &piece(text, score, kind), &mut out);
        }
        let mut trainer = Vec::new();
        int_field(3, model_type, &mut trainer);
        int_field(4, pieces.len() as i64, &mut trainer);
        int_field(40, 2, &mut trainer);
        int_field(41, -1, &mut trainer);
        int_field(42, 1, &mut trainer);
        int_field(43, 0, &mut trainer);
        bytes_field(2, &trainer, &mut out);
        let mut norm = Vec::new();
        bytes_field(1, b"nmt_nfkc", &mut norm);
        if let Some(cm) = charsmap {
            bytes_field(2, cm, &mut norm);
        }
        int_field(3, 1, &mut norm);
        bytes_field(3, &norm, &mut out);
        bytes_field(99, b"an unknown field", &mut out);
        out
    }

    #[test]
    fn parses_a_hand_made_model() {
        let m = parse(&tiny_model(1, None)).unwrap();
        assert_eq!(m.pieces.len(), 12);
        assert_eq!(
            m.pieces[4],
            Piece {
                piece: "\u{2581}cat".into(),
                score: -1.0,
                kind: PieceKind::Normal
            }
        );
        assert_eq!(m.pieces[0].kind, PieceKind::Control);
        assert_eq!(m.pieces[2].kind, PieceKind::Unknown);
        assert_eq!(
            m.trainer,
            TrainerSpec {
                model_type: ModelType::Unigram,
                vocab_size: 12,
                byte_fallback: false,
                unk_id: 2,
                bos_id: -1,
                eos_id: 1,
                pad_id: 0
            }
        );
        assert_eq!(m.normalizer.name, "nmt_nfkc");
        assert!(m.normalizer.precompiled_charsmap.is_empty());
        assert!(m.normalizer.add_dummy_prefix && m.normalizer.escape_whitespaces);
        // Defaults when a message is absent.
        let only_pieces = {
            let mut out = Vec::new();
            bytes_field(1, &piece("x", 0.0, 1), &mut out);
            out
        };
        let m = parse(&only_pieces).unwrap();
        assert_eq!(m.trainer, TrainerSpec::default());
        assert_eq!((m.trainer.unk_id, m.trainer.pad_id), (0, -1));
        assert_eq!(m.normalizer, NormalizerSpec::default());
        // An undefined enum value leaves the field at its default, as protobuf does.
        let mut out = Vec::new();
        bytes_field(1, &piece("x", 0.5, 9), &mut out);
        assert_eq!(parse(&out).unwrap().pieces[0].kind, PieceKind::Normal);
    }

    #[test]
    fn builds_t5s_pipeline() {
        let m = parse(&tiny_model(1, None)).unwrap();
        let tok = t5_tokenizer(&m, 3).unwrap();
        assert_eq!(tok.get_vocab_size(true), 15);
        assert_eq!(tok.token_to_id("<extra_id_2>"), Some(12));
        assert_eq!(tok.token_to_id("<extra_id_0>"), Some(14));
        for prompt in ["cat dog", "  cat \t dog\n"] {
            let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
            assert_eq!(ids, vec![4, 5], "{prompt:?}");
        }
        // Unknown characters map to 2; the charsmap-less model has no normalizer.
        assert_eq!(tok.encode("cax", false).unwrap().get_ids(), &[3, 6, 7, 2]);
        assert!(tok.get_normalizer().is_none());
        assert_eq!(tok.decode(&[4, 5], true).unwrap(), "cat dog");
        let added = added_pieces(&m);
        let names: Vec<(&str, bool)> = added
            .iter()
            .map(|t| (t.content.as_str(), t.special))
            .collect();
        assert_eq!(names, [("<pad>", true), ("</s>", true)]);
    }

    #[test]
    fn non_unigram_and_non_t5_models_are_rejected() {
        let bpe = parse(&tiny_model(2, None)).unwrap();
        assert_eq!(bpe.trainer.model_type, ModelType::Bpe);
        let e = t5_tokenizer(&bpe, 0).unwrap_err();
        assert!(e.0.contains("BPE SentencePiece model"), "{e}");
        let mut m = parse(&tiny_model(1, None)).unwrap();
        m.trainer.unk_id = 0;
        assert!(t5_tokenizer(&m, 0).unwrap_err().0.contains("unknown piece"));
        m.trainer.unk_id = 2;
        m.pieces[2].kind = PieceKind::Normal;
        assert!(t5_tokenizer(&m, 0).unwrap_err().0.contains("unknown piece"));
    }

    #[test]
    fn truncated_files_are_errors_not_panics() {
        let full = tiny_model(1, None);
        assert!(parse(&full).is_ok());
        for n in 0..full.len() {
            // Every prefix either parses (cut at a field boundary) or says why not.
            match parse(&full[..n]) {
                Ok(m) => assert!(!m.pieces.is_empty()),
                Err(e) => assert!(!e.0.is_empty()),
            }
        }
        let e = parse(&full[..full.len() - 3]).unwrap_err();
        assert!(e.0.contains("truncated"), "{e}");
        assert!(parse(&[]).unwrap_err().0.contains("empty"));
        assert!(parse(b"\x0a").unwrap_err().0.contains("truncated"));
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let full = tiny_model(1, None);
        // Flipping any byte either still parses or gives an error; never a panic.
        for i in 0..full.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = full.clone();
                b[i] ^= flip;
                if let Ok(m) = parse(&b) {
                    let _ = t5_tokenizer(&m, 2);
                }
            }
        }
        let cases: [(&[u8], &str); 6] = [
            (b"\x00\x01", "invalid field number"),
            (b"\x0b\x00", "wire type 3"),
            (b"\x0f", "wire type 7"),
            (b"\x08\x01", "is a varint, not length-delimited"),
            (b"\x0a\x03\x0a\x01\xff", "not UTF-8"),
            (
                b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
                "longer than 64 bits",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse(bytes).unwrap_err();
            assert!(e.0.contains(want), "{bytes:?}: {e}");
        }
        // Fields with a 64-bit wire type and unknown numbers are skipped.
        let mut out = Vec::new();
        tag(7, 1, &mut out);
        out.extend_from_slice(&[0; 8]);
        bytes_field(1, &piece("x", 0.0, 1), &mut out);
        assert_eq!(parse(&out).unwrap().pieces.len(), 1);
        // sentencepiece's own rules on pieces.
        let mut out = Vec::new();
        bytes_field(1, &piece("x", 0.0, 1), &mut out);
        bytes_field(1, &piece("x", 0.0, 1), &mut out);
        assert!(parse(&out).unwrap_err().0.contains("twice"));
        let mut out = Vec::new();
        bytes_field(1, &piece("", 0.0, 1), &mut out);
        assert!(parse(&out).unwrap_err().0.contains("empty"));
        let mut out = Vec::new();
        int_field(5, 1, &mut out);
        assert!(parse(&out).unwrap_err().0.contains("no pieces"));
    }

    /// A charsmap mapping "A" to "a" (darts-clone layout: one 256-unit block).
    fn tiny_charsmap() -> Vec<u8> {
        let mut units = vec![0u32; 256];
        // Root: offset 1 (node 1); child 'A' at 1 ^ 0x41 = 0x40, label 'A', has_leaf, offset to its leaf.
        units[0] = 1 << 10;
        let child = 1 ^ 0x41;
        let leaf_node = child ^ 2; // offset 2 from the child
        units[child] = (2 << 10) | (1 << 8) | 0x41;
        units[leaf_node] = 0; // value 0: "a" at byte 0 of the replacements
        let mut blob = ((units.len() * 4) as u32).to_le_bytes().to_vec();
        for u in units {
            blob.extend_from_slice(&u.to_le_bytes());
        }
        blob.extend_from_slice(b"a\0");
        blob
    }

    #[test]
    fn charsmaps_are_checked_before_use() {
        let cm = tiny_charsmap();
        check_charsmap(&cm).unwrap();
        let m = parse(&tiny_model(1, Some(&cm))).unwrap();
        assert_eq!(m.normalizer.precompiled_charsmap, cm);
        let tok = t5_tokenizer(&m, 0).unwrap();
        assert!(tok.get_normalizer().is_some());
        assert_eq!(tok.encode("cAt dog", false).unwrap().get_ids(), &[4, 5]);
        assert_eq!(tok.encode("cAt", false).unwrap().get_ids(), &[4]);

        for bad in [&b""[..], b"\x08\x00\x00\x00\x01", b"\x00\x00\x00\x00"] {
            assert!(check_charsmap(bad).is_err(), "{bad:?}");
        }
        // A trie smaller than one block: lookups would leave it.
        let mut short = 8u32.to_le_bytes().to_vec();
        short.extend_from_slice(&[0; 8]);
        assert!(check_charsmap(&short)
            .unwrap_err()
            .0
            .contains("outside the trie"));
        // A replacement offset past the strings.
        let mut far = cm.clone();
        let leaf = 4 + 4 * ((1 ^ 0x41) ^ 2);
        far[leaf..leaf + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(check_charsmap(&far).unwrap_err().0.contains("replacement"));
        // Non-UTF-8 replacements.
        let mut latin1 = cm.clone();
        let n = latin1.len();
        latin1[n - 2] = 0xe9;
        assert!(check_charsmap(&latin1).unwrap_err().0.contains("UTF-8"));
        // Every byte flipped in the trie: an error or a charsmap that is safe to use.
        for i in 0..cm.len() {
            let mut b = cm.clone();
            b[i] ^= 0x5a;
            if check_charsmap(&b).is_ok() {
                let p = Precompiled::from(&b).unwrap();
                for s in ["A", "cat", "\u{e9}", "\u{1f600}", "ab\u{301}c"] {
                    let _ = p.normalize_string(s);
                }
            }
        }
    }
}
