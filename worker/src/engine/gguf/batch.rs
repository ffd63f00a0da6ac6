//! The GGUF engine as a batched engine: a context (KV cache, sampler, text stream) per job, and
//! one pass over the weights per step for every job that advances.
//!
//! Each job goes through exactly the states of the one-job path (`Engine::generate_checked`):
//! its prompt in chunks, the first token sampled from the last chunk's logits, then one token
//! per step, ending at an end-of-generation token, a stop sequence, `max_tokens` or the
//! context. A job's rows never see another job's context, so its tokens are the ones it would
//! get alone, up to the rounding of batched versus single-row products (see
//! `tests/gguf_batch.rs` for the tolerance).

use std::collections::HashMap;

use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;

use super::decoder::{Context, Part};
use super::stream::TextStream;
use super::{GgufEngine, inference, sampler};
use crate::engine::{BatchEngine, Emitted, EngineError, Finish, GenerateRequest, SeqId, Work};

/// Generated positions a job's KV cache has room for from the start.
const RESERVE_AHEAD: usize = 512;

/// One job held by the engine.
pub(super) struct Seq {
    /// The prompt's ids.
    ids: Vec<u32>,
    /// Prompt ids run so far.
    fed: usize,
    /// Positions in the cache (prompt run + tokens fed back).
    pos: usize,
    /// The token sampled last, fed in the next step.
    next: u32,
    caches: Context,
    sampler: LogitsProcessor,
    text: TextStream,
    tokens: u32,
    max_tokens: u32,
    done: bool,
    /// The ids sampled so far (end-of-generation excluded), for `GgufEngine::generated`.
    generated: Vec<u32>,
}

impl GgufEngine {
    /// The ids job `id` has generated so far (tests compare them with the job run alone).
    pub fn generated(&self, id: SeqId) -> Option<&[u32]> {
        self.jobs.get(&id).map(|s| s.generated.as_slice())
    }
}

/// Jobs by id.
pub(super) type Seqs = HashMap<SeqId, Seq>;

impl BatchEngine for GgufEngine {
    fn model(&self) -> &str {
        &self.model_name
    }

    fn admit(&mut self, id: SeqId, req: &GenerateRequest) -> Result<u32, EngineError> {
        if self.jobs.contains_key(&id) {
            return Err(EngineError::Prompt(format!("job {id} is already running")));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::Prompt("max_tokens is 0".into()));
        }
        let ids = self.prompt_ids(&req.prompt)?;
        let prompt_tokens = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        // The most positions the job can reach (the last token sampled is never fed back),
        // allocated once; a job asking for many tokens gets room for `RESERVE_AHEAD` of them
        // and grows from there, so a generous max_tokens does not pin memory it may not use.
        let ahead = (req.max_tokens as usize - 1).min(RESERVE_AHEAD);
        let positions = (ids.len() + ahead).min(self.context_len);
        let caches = self.weights.new_caches(positions).map_err(inference)?;
        self.jobs.insert(
            id,
            Seq {
                ids,
                fed: 0,
                pos: 0,
                next: 0,
                caches,
                sampler: sampler(&req.sampling),
                text: TextStream::new(&self.opts.stop),
                tokens: 0,
                max_tokens: req.max_tokens,
                done: false,
                generated: Vec::new(),
            },
        );
        Ok(prompt_tokens)
    }

    fn pending_prompt(&self, id: SeqId) -> usize {
        self.jobs
            .get(&id)
            .filter(|s| !s.done)
            .map_or(0, |s| s.ids.len() - s.fed)
    }

    fn step(&mut self, work: &[Work], out: &mut Vec<(SeqId, Emitted)>) -> Result<(), EngineError> {
        let budget: HashMap<SeqId, usize> = work.iter().map(|w| (w.id, w.prompt_tokens)).collect();
        // Per part, in order: its job, the prompt ids it runs (0 when it decodes), and whether
        // its logits come back.
        let mut runs: Vec<(SeqId, usize, bool)> = Vec::with_capacity(work.len());
        let mut parts = Vec::with_capacity(work.len());
        for (&id, seq) in self.jobs.iter_mut() {
            let Some(&prompt_budget) = budget.get(&id) else {
                continue;
            };
            if seq.done {
                continue;
            }
            let Seq {
                ids,
                fed,
                pos,
                next,
                caches,
                ..
            } = seq;
            let part = if *fed < ids.len() {
                let n = prompt_budget.max(1).min(ids.len() - *fed);
                let last = *fed + n == ids.len();
                runs.push((id, n, last));
                Part {
                    ids: &ids[*fed..*fed + n],
                    pos: *pos,
                    caches,
                    logits: last,
                }
            } else {
                runs.push((id, 0, true));
                Part {
                    ids: std::slice::from_ref(next),
                    pos: *pos,
                    caches,
                    logits: true,
                }
            };
            parts.push(part);
        }
        if parts.is_empty() {
            return Ok(());
        }
        let logits = self.weights.forward_batch(&mut parts).map_err(inference)?;
        drop(parts);
        let mut row = 0;
        for (id, prompt, wants) in runs {
            let Some(seq) = self.jobs.get_mut(&id) else {
                continue;
            };
            if prompt > 0 {
                seq.fed += prompt;
                seq.pos += prompt;
            } else {
                seq.pos += 1;
            }
            if !wants {
                continue;
            }
            let l = logits.get(row).map_err(inference)?;
            row += 1;
            let ctx = Ctx {
                tokenizer: &self.tokenizer,
                context_len: self.context_len,
            };
            ctx.after_logits(id, seq, &l, out);
        }
        Ok(())
    }

    fn release(&mut self, id: SeqId) {
        self.jobs.remove(&id);
    }
}

/// What a job's next token depends on besides its own state.
struct Ctx<'a> {
    tokenizer: &'a super::tokenizer::GgufTokenizer,
    context_len: usize,
}

impl Ctx<'_> {
    /// Samples the job's next token from `logits` and reports it, or the job's end.
    fn after_logits(
        &self,
        id: SeqId,
        seq: &mut Seq,
        logits: &Tensor,
        out: &mut Vec<(SeqId, Emitted)>,
    ) {
        let next = match seq.sampler.sample(logits) {
            Ok(n) => n,
            Err(e) => {
                seq.done = true;
                out.push((id, Emitted::Failed(e.to_string())));
                return;
            }
        };
        if self.tokenizer.is_eog(next) {
            return self.finish(id, seq, next, out);
        }
        seq.tokens += 1;
        seq.generated.push(next);
        let Some(bytes) = self.tokenizer.piece(next) else {
            seq.done = true;
            let why = format!(
                "the model produced token {next}, outside its vocabulary of {}",
                self.tokenizer.vocab_size()
            );
            out.push((id, Emitted::Failed(why)));
            return;
        };
        let pushed = seq.text.push(bytes);
        // As in the one-job path: held-back text leaves with a later token.
        if !pushed.text.is_empty() {
            out.push((
                id,
                Emitted::Token {
                    id: next,
                    text: pushed.text,
                },
            ));
        }
        if pushed.stopped {
            seq.done = true;
            out.push((id, Emitted::Finished(complete(seq))));
            return;
        }
        if seq.tokens >= seq.max_tokens || seq.pos >= self.context_len {
            return self.finish(id, seq, next, out);
        }
        seq.next = next;
    }

    /// Ends the job: whatever text is still held back, then `Finished`.
    fn finish(&self, id: SeqId, seq: &mut Seq, last: u32, out: &mut Vec<(SeqId, Emitted)>) {
        seq.done = true;
        let rest = seq.text.finish();
        if !rest.is_empty() {
            out.push((
                id,
                Emitted::Token {
                    id: last,
                    text: rest,
                },
            ));
        }
        out.push((id, Emitted::Finished(complete(seq))));
    }
}

fn complete(seq: &Seq) -> Finish {
    Finish::Complete {
        tokens: seq.tokens,
        prompt_tokens: u32::try_from(seq.ids.len()).unwrap_or(u32::MAX),
    }
}
