// lmmc_embed: pooled embeddings of an lmmc student from C++ with OpenVINO.
//
//   lmmc_embed OUT_DIR INPUT OUTPUT [--precision fp32|int8] [--format ir|onnx] [--tower NAME] [--threads N]
//              [--inference f32|bf16]
//
// Reads OUT_DIR/manifest.json, picks the tower's artifact (OpenVINO IR, or the ONNX file, which OpenVINO
// reads too) in the asked precision, runs INPUT through it and writes one pooled embedding per line to
// OUTPUT. INPUT for a text tower: one sample per line, its token ids separated by spaces (as the saved
// tokenizer makes them; shorter lines are padded and masked, to the manifest's fixed length where the model
// reads every text at one length, as SigLIP does). For an image tower: raw little-endian
// float32 pixel values, samples one after another in the manifest's [channels, height, width] layout.
// --inference bf16 runs the layers OpenVINO keeps in floating point in bf16, as lmmc.runtime's
// inference_precision="bf16" does: faster on CPUs with bf16 units, close to but not equal to f32.
#include <openvino/openvino.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"

namespace {

struct Options {
    std::string out_dir, input, output, precision = "fp32", format = "ir", tower, inference = "f32";
    int threads = 0;
};

[[noreturn]] void usage(const std::string& problem) {
    throw std::invalid_argument(problem + "\nusage: lmmc_embed OUT_DIR INPUT OUTPUT [--precision fp32|int8] "
                                "[--format ir|onnx] [--tower NAME] [--threads N] [--inference f32|bf16]");
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
            else if (a == "--threads") o.threads = std::stoi(v);
            else if (a == "--inference") o.inference = v;
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

// Token ids, one sample a line, padded with `pad_id` to the longest line or to `pad_to` tokens when the
// model reads texts at a fixed length (0: it does not); the mask marks real tokens.
void read_token_ids(const std::string& path, size_t pad_to, int64_t pad_id, std::vector<int64_t>& ids,
                    std::vector<int64_t>& mask, size_t& batch, size_t& seq) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read '" + path + "'");
    std::vector<std::vector<int64_t>> rows;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream s(line);
        std::vector<int64_t> row;
        int64_t id;
        while (s >> id) row.push_back(id);
        if (!s.eof()) throw std::runtime_error("'" + path + "' line " + std::to_string(rows.size() + 1) + " is not token ids");
        if (!row.empty()) rows.push_back(row);
    }
    if (rows.empty()) throw std::runtime_error("'" + path + "' holds no token ids");
    batch = rows.size();
    seq = pad_to;
    for (size_t b = 0; b < batch; ++b) {
        if (pad_to && rows[b].size() > pad_to) {
            throw std::runtime_error("'" + path + "' line " + std::to_string(b + 1) + " has " +
                                     std::to_string(rows[b].size()) + " token ids; this model reads texts of " +
                                     std::to_string(pad_to) + " tokens: truncate them to that many");
        }
        seq = std::max(seq, rows[b].size());
    }
    ids.assign(batch * seq, pad_id);
    mask.assign(batch * seq, 0);
    for (size_t b = 0; b < batch; ++b) {
        for (size_t t = 0; t < rows[b].size(); ++t) {
            ids[b * seq + t] = rows[b][t];
            mask[b * seq + t] = 1;
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

}  // namespace

int main(int argc, char** argv) {
    try {
        const Options o = parse_args(argc, argv);
        const mini_json::Value manifest = mini_json::parse(read_file(o.out_dir + "/manifest.json"));
        const std::string tower = o.tower.empty() ? default_tower(manifest) : o.tower;
        if (!manifest["towers"].has(tower)) throw std::runtime_error("the manifest has no tower '" + tower + "'");
        const mini_json::Value& artifact = pick_artifact(manifest, o, tower);
        const std::string path = o.out_dir + "/" + artifact["path"].string;

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
        ov::CompiledModel compiled = core.compile_model(core.read_model(path), "CPU", config);
        ov::InferRequest request = compiled.create_infer_request();

        if (manifest["towers"][tower]["modality"].string == "text") {
            std::vector<int64_t> ids, mask;
            size_t batch = 0, seq = 0;
            const mini_json::Value& text = manifest["preprocessing"]["text"];
            const bool fixed = text.has("pad_to");
            read_token_ids(o.input, fixed ? static_cast<size_t>(text["pad_to"].number) : 0,
                           fixed ? static_cast<int64_t>(text["pad_id"].number) : 0, ids, mask, batch, seq);
            const ov::Shape shape{batch, seq};
            request.set_tensor("input_ids", int_tensor(compiled.input("input_ids").get_element_type(), ids, shape));
            request.set_tensor("attention_mask",
                               int_tensor(compiled.input("attention_mask").get_element_type(), mask, shape));
        } else {
            const auto& dims = artifact["inputs"].array.at(0)["shape"].array;  // [null, C, H, W]
            ov::Shape shape{0};
            size_t per_sample = 1;
            for (size_t i = 1; i < dims.size(); ++i) {
                shape.push_back(static_cast<size_t>(dims[i].number));
                per_sample *= shape.back();
            }
            const std::string bytes = read_file(o.input);
            if (bytes.empty() || bytes.size() % (per_sample * sizeof(float)) != 0) {
                throw std::runtime_error("'" + o.input + "' is not a whole number of float32 images of " +
                                         std::to_string(per_sample) + " values");
            }
            shape[0] = bytes.size() / (per_sample * sizeof(float));
            ov::Tensor pixels(ov::element::f32, shape);
            std::copy(bytes.begin(), bytes.end(), static_cast<char*>(pixels.data()));
            request.set_tensor("pixel_values", pixels);
        }
        request.infer();

        const ov::Tensor pooled = request.get_tensor("pooled_embedding");
        const ov::Shape out_shape = pooled.get_shape();
        const float* data = pooled.data<const float>();
        std::ofstream out(o.output);
        if (!out) throw std::runtime_error("cannot write '" + o.output + "'");
        out << std::setprecision(9);
        for (size_t b = 0; b < out_shape[0]; ++b) {
            for (size_t d = 0; d < out_shape[1]; ++d) out << (d ? " " : "") << data[b * out_shape[1] + d];
            out << "\n";
        }
        std::cerr << "lmmc_embed: " << out_shape[0] << " embeddings of " << out_shape[1] << " values from "
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
