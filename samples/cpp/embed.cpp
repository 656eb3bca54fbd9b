// lmmc_embed: pooled embeddings of an lmmc student from C++ with OpenVINO.
//
//   lmmc_embed OUT_DIR INPUT OUTPUT [--precision fp32|int8] [--format ir|onnx] [--tower NAME] [--threads N]
//              [--inference f32|bf16] [--static BATCH[,SEQ]]
//
// Reads OUT_DIR/manifest.json, picks the tower's artifact (OpenVINO IR, or the ONNX file, which OpenVINO
// reads too) in the asked precision, runs INPUT through it and writes one pooled embedding per line to
// OUTPUT. INPUT for a text tower: one sample per line, its token ids separated by spaces (as the saved
// tokenizer makes them; shorter lines are padded and masked, to the manifest's fixed length where the model
// reads every text at one length, as SigLIP does). For an image tower: raw little-endian
// float32 pixel values, samples one after another in the manifest's [channels, height, width] layout.
// --inference bf16 runs the layers OpenVINO keeps in floating point in bf16, as lmmc.runtime's
// inference_precision="bf16" does: faster on CPUs with bf16 units, close to but not equal to f32.
// --static compiles the model for one input shape, BATCH samples of SEQ tokens (images: BATCH), as
// lmmc.runtime's static_shape does: faster where inputs always come at that size. The samples then run
// BATCH at a time, the last batch filled up with masked rows, and every line is padded to SEQ tokens.
#include <openvino/openvino.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"

namespace {

struct Options {
    std::string out_dir, input, output, precision = "fp32", format = "ir", tower, inference = "f32";
    int threads = 0;
    size_t static_batch = 0, static_seq = 0;  // --static; 0: dynamic shapes
};

[[noreturn]] void usage(const std::string& problem) {
    throw std::invalid_argument(problem + "\nusage: lmmc_embed OUT_DIR INPUT OUTPUT [--precision fp32|int8] "
                                "[--format ir|onnx] [--tower NAME] [--threads N] [--inference f32|bf16] "
                                "[--static BATCH[,SEQ]]");
}

bool positive(const std::string& s) {
    return !s.empty() && s.size() < 10 && std::all_of(s.begin(), s.end(), ::isdigit) && std::stoul(s) > 0;
}

// "8,128" -> (8, 128); "8" -> (8, 0).
void parse_static(const std::string& v, Options& o) {
    const size_t comma = v.find(',');
    const std::string batch = v.substr(0, comma), seq = comma == std::string::npos ? "" : v.substr(comma + 1);
    if (!positive(batch) || (comma != std::string::npos && !positive(seq))) {
        usage("--static is BATCH or BATCH,SEQ, positive integers, not '" + v + "'");
    }
    o.static_batch = std::stoul(batch);
    o.static_seq = seq.empty() ? 0 : std::stoul(seq);
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a.rfind("--", 0) == 0) {
            if (i + 1 >= argc) usage(a + " needs a value");
            std::string v = argv[++i];
            if (a == "--precision") o.precision = v;
            else if (a == "--format") o.format = v;
            else if (a == "--tower") o.tower = v;
            else if (a == "--threads") {
                if (!positive(v)) usage("--threads is a positive integer, not '" + v + "'");
                o.threads = std::stoi(v);
            }
            else if (a == "--inference") o.inference = v;
            else if (a == "--static") parse_static(v, o);
            else usage("unknown option " + a);
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 3) usage("expected OUT_DIR INPUT OUTPUT");
    if (o.precision != "fp32" && o.precision != "int8") usage("--precision is fp32 or int8");
    if (o.format != "ir" && o.format != "onnx") usage("--format is ir or onnx");
    if (o.inference != "f32" && o.inference != "bf16") usage("--inference is f32 or bf16");
    o.out_dir = positional[0], o.input = positional[1], o.output = positional[2];
    return o;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read '" + path + "'");
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

// The manifest entry for the tower in the asked format and precision. ONNX INT8 prefers the static QDQ
// graph, whose quantisation OpenVINO carries out; the dynamic one quantises in ONNX Runtime's own ops.
const mini_json::Value& pick_artifact(const mini_json::Value& manifest, const Options& o, const std::string& tower) {
    const std::string backend = o.format == "ir" ? "openvino" : "onnxruntime";
    const mini_json::Value* best = nullptr;
    for (const auto& a : manifest["artifacts"].array) {
        if (a["tower"].string != tower || a["backend"].string != backend || a["precision"].string != o.precision) continue;
        const std::string& variant = a["variant"].string;
        if (!best || variant == "plain" || variant == "static") best = &a;
    }
    if (!best) {
        throw std::runtime_error("the manifest lists no " + backend + " " + o.precision + " artifact for the '" + tower +
                                 "' tower; compile with the export step that writes it (openvino or ort)");
    }
    return *best;
}

std::string default_tower(const mini_json::Value& manifest) {
    const auto& towers = manifest["towers"].object;
    for (const auto& [name, t] : towers) {
        if (t["modality"].string == "text") return name;
    }
    return towers.begin()->first;
}

// Token ids, one sample a line, each in [0, vocab) (0: not checked), padded with `pad_id` (before the ids
// with `left`, as a left-padding tokenizer pads) to the longest line or to `pad_to` tokens when the model
// reads texts at one length; no line longer than `max_tokens` (0: any; `limit` says why a longer line is
// refused). The mask marks real tokens.
void read_token_ids(const std::string& path, size_t pad_to, size_t max_tokens, const std::string& limit,
                    int64_t pad_id, bool left, int64_t vocab, std::vector<int64_t>& ids, std::vector<int64_t>& mask,
                    size_t& batch, size_t& seq) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read '" + path + "'");
    std::vector<std::vector<int64_t>> rows;
    std::vector<size_t> line_of;  // each row's line in the file, for messages
    std::string line;
    size_t n = 0, blank = 0;
    while (std::getline(in, line)) {
        ++n;
        std::istringstream s(line);
        std::vector<int64_t> row;
        int64_t id;
        while (s >> id) row.push_back(id);
        const std::string where = "'" + path + "' line " + std::to_string(n);
        if (!s.eof()) throw std::runtime_error(where + " is not token ids");
        for (int64_t t : row) {
            // OpenVINO reads an id outside the embedding table as a row of zeros, silently
            if (t < 0 || (vocab && t >= vocab)) {
                throw std::runtime_error(where + " holds token id " + std::to_string(t) + ", outside this model's "
                                         "vocabulary [0, " + std::to_string(vocab) + "); write the ids with this "
                                         "output's own tokenizer (student/)");
            }
        }
        if (row.empty()) {
            blank = blank ? blank : n;
            continue;
        }
        // a tokenizer writes [CLS] [SEP] even for an empty text: a blank line would shift every row after it
        if (blank) {
            throw std::runtime_error("'" + path + "' line " + std::to_string(blank) + " holds no token ids; every "
                                     "line is one sample");
        }
        rows.push_back(row);
        line_of.push_back(n);
    }
    if (rows.empty()) throw std::runtime_error("'" + path + "' holds no token ids");
    batch = rows.size();
    seq = pad_to;
    for (size_t b = 0; b < batch; ++b) {
        if (max_tokens && rows[b].size() > max_tokens) {
            throw std::runtime_error("'" + path + "' line " + std::to_string(line_of[b]) + " has " +
                                     std::to_string(rows[b].size()) + " token ids; " + limit +
                                     ": truncate them to that many");
        }
        seq = std::max(seq, rows[b].size());
    }
    ids.assign(batch * seq, pad_id);
    mask.assign(batch * seq, 0);
    for (size_t b = 0; b < batch; ++b) {
        const size_t start = b * seq + (left ? seq - rows[b].size() : 0);
        for (size_t t = 0; t < rows[b].size(); ++t) {
            ids[start + t] = rows[b][t];
            mask[start + t] = 1;
        }
    }
}

// An integer input tensor in the element type the model declares (the exports use int64).
ov::Tensor int_tensor(const ov::element::Type& type, const std::vector<int64_t>& values, const ov::Shape& shape) {
    ov::Tensor t(type, shape);
    if (type == ov::element::i64) {
        std::copy(values.begin(), values.end(), t.data<int64_t>());
    } else if (type == ov::element::i32) {
        std::transform(values.begin(), values.end(), t.data<int32_t>(), [](int64_t v) { return static_cast<int32_t>(v); });
    } else {
        throw std::runtime_error("token inputs of type " + type.get_type_name() + " are not supported");
    }
    return t;
}

// A size the manifest gives: a whole number from 1 to `most`. An edited manifest's zero would divide by zero,
// and a huge or negative one allocate without bound.
size_t manifest_size(const mini_json::Value& v, const std::string& what, double most) {
    if (v.kind != mini_json::Value::Kind::Number || v.number < 1 || v.number > most || v.number != std::floor(v.number)) {
        throw std::runtime_error("the manifest's " + what + " is not a whole number from 1 to " +
                                 std::to_string(static_cast<long long>(most)) + "; compile again to rewrite it");
    }
    return static_cast<size_t>(v.number);
}

// The artifact's file in OUT_DIR: a manifest names only files of its own output directory, as lmmc.runtime
// checks; an edited one may not have a file elsewhere read.
std::string inside(const std::string& out_dir, const std::string& name) {
    if (name.empty() || name.front() == '/' || ("/" + name + "/").find("/../") != std::string::npos) {
        throw std::runtime_error("the manifest names '" + name + "', which is not a file inside '" + out_dir +
                                 "'; compile again to rewrite it");
    }
    return out_dir + "/" + name;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Options o = parse_args(argc, argv);
        const mini_json::Value manifest = mini_json::parse(read_file(o.out_dir + "/manifest.json"));
        const std::string tower = o.tower.empty() ? default_tower(manifest) : o.tower;
        if (!manifest["towers"].has(tower)) throw std::runtime_error("the manifest has no tower '" + tower + "'");
        const mini_json::Value& artifact = pick_artifact(manifest, o, tower);
        const std::string path = inside(o.out_dir, artifact["path"].string);
        // the graph and what it reads beside it (an IR's weights, an ONNX file's external data): OpenVINO's own
        // message for a missing one names a check in its sources, or no file at all
        std::vector<std::string> files{artifact["path"].string};
        if (artifact.has("files")) {
            for (const auto& f : artifact["files"].array) files.push_back(f.string);
        }
        for (const auto& f : files) {
            if (!std::ifstream(inside(o.out_dir, f)).good()) {
                throw std::runtime_error("'" + f + "', which the manifest lists, is missing from '" + o.out_dir +
                                         "'; copy the whole output directory, or compile again");
            }
        }

        ov::Core core;
        // f32 inference unless asked, as lmmc.runtime does: CPUs with bf16 units would otherwise run fp32
        // layers in bf16. bf16 on a CPU without the units is refused rather than silently run in f32.
        if (o.inference == "bf16") {
            const auto caps = core.get_property("CPU", ov::device::capabilities);
            if (std::find(caps.begin(), caps.end(), ov::device::capability::BF16) == caps.end()) {
                throw std::runtime_error("--inference bf16: this CPU has no bf16 units (AVX512-BF16 or AMX); "
                                         "use --inference f32");
            }
        }
        ov::AnyMap config{ov::hint::inference_precision(o.inference == "bf16" ? ov::element::bf16 : ov::element::f32),
                          ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY), ov::num_streams(1)};
        if (o.threads > 0) config.emplace(ov::inference_num_threads(o.threads));
        const bool text_tower = manifest["towers"][tower]["modality"].string == "text";
        std::shared_ptr<ov::Model> model = core.read_model(path);

        // The whole input in host memory: token ids and mask [batch, seq], or pixels [batch, C, H, W].
        std::vector<int64_t> ids, mask;
        int64_t pad_id = 0;
        std::vector<float> pixels;
        size_t batch = 0, seq = 0;
        ov::Shape sample_shape;  // one sample's shape past the batch axis
        if (text_tower) {
            const mini_json::Value& text = manifest["preprocessing"]["text"];
            const bool fixed = text.has("pad_to");
            size_t pad_to = fixed ? manifest_size(text["pad_to"], "preprocessing.text.pad_to", 1 << 20) : 0;
            std::string limit = "this model reads texts of " + std::to_string(pad_to) + " tokens";
            // the length the compile cut texts to, within the model's positions (null: the tokenizer's own)
            size_t max_tokens = pad_to;
            if (!fixed && text.has("max_length") && text["max_length"].kind == mini_json::Value::Kind::Number) {
                max_tokens = manifest_size(text["max_length"], "preprocessing.text.max_length", 1 << 20);
                limit = "this model reads at most " + std::to_string(max_tokens) + " tokens (the manifest's "
                        "preprocessing.text.max_length)";
            }
            if (o.static_batch) {
                if (!o.static_seq) usage("--static needs BATCH,SEQ for a text tower");
                if (fixed && o.static_seq != pad_to) usage(limit + ": pass --static BATCH," + std::to_string(pad_to));
                if (max_tokens && o.static_seq > max_tokens) usage(limit + ": pass --static BATCH," + std::to_string(max_tokens) + " or less");
                pad_to = max_tokens = o.static_seq;
                limit = "--static compiles the model for " + std::to_string(pad_to) + " tokens";
            }
            pad_id = fixed ? static_cast<int64_t>(text["pad_id"].number) : 0;
            const int64_t vocab = text.has("vocab_size") ? static_cast<int64_t>(text["vocab_size"].number) : 0;
            const bool left = text.has("padding_side") && text["padding_side"].string == "left";
            read_token_ids(o.input, pad_to, max_tokens, limit, pad_id, left, vocab, ids, mask, batch, seq);
            // a model whose tokenizer returns no mask (SigLIP as Google ships it) reads its padding too
            if (text.has("attend_to_padding") && text["attend_to_padding"].boolean) std::fill(mask.begin(), mask.end(), 1);
            sample_shape = {seq};
        } else {
            const auto& dims = artifact["inputs"].array.at(0)["shape"].array;  // [null, C, H, W]
            size_t per_sample = 1;
            for (size_t i = 1; i < dims.size(); ++i) {
                sample_shape.push_back(manifest_size(dims[i], "image input's shape", 1 << 16));
                per_sample *= sample_shape.back();
            }
            const std::string bytes = read_file(o.input);
            if (bytes.empty() || bytes.size() % (per_sample * sizeof(float)) != 0) {
                throw std::runtime_error("'" + o.input + "' is not a whole number of float32 images of " +
                                         std::to_string(per_sample) + " values");
            }
            batch = bytes.size() / (per_sample * sizeof(float));
            pixels.resize(batch * per_sample);
            std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(pixels.data()));
            // a NaN pixel comes back as a NaN embedding: refused, as lmmc.runtime refuses it
            for (size_t i = 0; i < pixels.size(); ++i) {
                if (!std::isfinite(pixels[i])) {
                    throw std::runtime_error("'" + o.input + "' holds a NaN or infinite value in image " +
                                             std::to_string(i / per_sample) + "; check the pixels written");
                }
            }
        }

        // Dynamic shapes: the whole input in one run. Static: runs of static_batch samples.
        const size_t chunk = o.static_batch ? o.static_batch : batch;
        ov::Shape shape{chunk};
        shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
        if (o.static_batch) {
            std::map<std::string, ov::PartialShape> shapes;
            for (const auto& input : model->inputs()) shapes[input.get_any_name()] = ov::PartialShape(shape);
            model->reshape(shapes);
        }
        ov::CompiledModel compiled = core.compile_model(model, "CPU", config);
        ov::InferRequest request = compiled.create_infer_request();

        size_t per_sample = 1;
        for (size_t d : sample_shape) per_sample *= d;
        std::vector<float> embeddings;
        size_t width = 0;
        for (size_t start = 0; start < batch; start += chunk) {
            const size_t rows = std::min(chunk, batch - start);
            // rows past the input stay padding: pad ids with a zero mask, or zero pixels
            if (text_tower) {
                std::vector<int64_t> chunk_ids(chunk * seq, pad_id);
                std::vector<int64_t> chunk_mask(chunk * seq, 0);
                std::copy_n(ids.begin() + start * seq, rows * seq, chunk_ids.begin());
                std::copy_n(mask.begin() + start * seq, rows * seq, chunk_mask.begin());
                request.set_tensor("input_ids", int_tensor(compiled.input("input_ids").get_element_type(), chunk_ids, shape));
                request.set_tensor("attention_mask",
                                   int_tensor(compiled.input("attention_mask").get_element_type(), chunk_mask, shape));
            } else {
                ov::Tensor chunk_pixels(ov::element::f32, shape);
                std::fill_n(chunk_pixels.data<float>(), chunk * per_sample, 0.0f);
                std::copy_n(pixels.begin() + start * per_sample, rows * per_sample, chunk_pixels.data<float>());
                request.set_tensor("pixel_values", chunk_pixels);
            }
            request.infer();
            const ov::Tensor pooled = request.get_tensor("pooled_embedding");
            width = pooled.get_shape()[1];
            const float* data = pooled.data<const float>();
            embeddings.insert(embeddings.end(), data, data + rows * width);
        }

        std::ofstream out(o.output);
        if (!out) throw std::runtime_error("cannot write '" + o.output + "'");
        out << std::setprecision(9);
        for (size_t b = 0; b < batch; ++b) {
            for (size_t d = 0; d < width; ++d) out << (d ? " " : "") << embeddings[b * width + d];
            out << "\n";
        }
        out.flush();  // a full disk shows only here
        if (!out) throw std::runtime_error("could not write all of '" + o.output + "' (is the disk full?)");
        std::cerr << "lmmc_embed: " << batch << " embeddings of " << width << " values from "
                  << artifact["path"].string << " -> " << o.output << "\n";
        return 0;
    } catch (const std::invalid_argument& e) {
        std::cerr << "lmmc_embed: " << e.what() << "\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "lmmc_embed: " << e.what() << "\n";
        return 1;
    }
}
