// A small JSON reader, enough for lmmc's manifest.json: objects, arrays, strings, numbers, true/false/null.
// The sample keeps to OpenVINO and the standard library, so it builds with nothing else installed.
#pragma once

#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mini_json {

struct Value {
    enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
    bool boolean = false;
    double number = 0;
    std::string string;
    std::vector<Value> array;
    std::map<std::string, Value> object;

    bool is_null() const { return kind == Kind::Null; }
    const Value& operator[](const std::string& key) const {
        auto it = object.find(key);
        if (kind != Kind::Object || it == object.end()) throw std::runtime_error("manifest has no key '" + key + "'");
        return it->second;
    }
    bool has(const std::string& key) const { return kind == Kind::Object && object.count(key) > 0; }
};

class Parser {
public:
    explicit Parser(const std::string& text) : text_(text) {}

    Value parse() {
        Value v = value();
        space();
        if (pos_ != text_.size()) fail("trailing characters");
        return v;
    }

private:
    const std::string& text_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
    }
    void space() {
        while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
    }
    char peek() {
        space();
        if (pos_ >= text_.size()) fail("unexpected end");
        return text_[pos_];
    }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++pos_;
    }
    bool literal(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (text_.compare(pos_, n, word) != 0) return false;
        pos_ += n;
        return true;
    }

    Value value() {
        Value v;
        char c = peek();
        if (c == '{') {
            v.kind = Value::Kind::Object;
            ++pos_;
            if (peek() == '}') { ++pos_; return v; }
            do {
                std::string key = string_body();
                expect(':');
                v.object[key] = value();
            } while (more('}'));
        } else if (c == '[') {
            v.kind = Value::Kind::Array;
            ++pos_;
            if (peek() == ']') { ++pos_; return v; }
            do { v.array.push_back(value()); } while (more(']'));
        } else if (c == '"') {
            v.kind = Value::Kind::String;
            v.string = string_body();
        } else if (literal("true")) {
            v.kind = Value::Kind::Bool;
            v.boolean = true;
        } else if (literal("false")) {
            v.kind = Value::Kind::Bool;
        } else if (literal("null")) {
            v.kind = Value::Kind::Null;
        } else {
            const char* start = text_.c_str() + pos_;
            char* end = nullptr;
            v.number = std::strtod(start, &end);
            if (end == start) fail("unexpected character");
            v.kind = Value::Kind::Number;
            pos_ += static_cast<size_t>(end - start);
        }
        return v;
    }

    // After an element: true when a comma announces another, false at the closing bracket.
    bool more(char close) {
        char c = peek();
        ++pos_;
        if (c == ',') return true;
        if (c == close) return false;
        fail(std::string("expected ',' or '") + close + "'");
    }

    std::string string_body() {
        expect('"');
        std::string out;
        while (pos_ < text_.size() && text_[pos_] != '"') {
            char c = text_[pos_++];
            if (c != '\\') { out += c; continue; }
            if (pos_ >= text_.size()) fail("unfinished escape");
            char e = text_[pos_++];
            switch (e) {
                case 'n': out += '\n'; break;
                case 't': out += '\t'; break;
                case 'r': out += '\r'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {  // paths and names in a manifest: encode the code point as UTF-8
                    if (pos_ + 4 > text_.size()) fail("short \\u escape");
                    for (size_t i = pos_; i < pos_ + 4; ++i) {
                        if (!std::isxdigit(static_cast<unsigned char>(text_[i]))) fail("bad \\u escape");
                    }
                    unsigned code = std::stoul(text_.substr(pos_, 4), nullptr, 16);
                    pos_ += 4;
                    if (code < 0x80) {
                        out += static_cast<char>(code);
                    } else if (code < 0x800) {
                        out += static_cast<char>(0xC0 | (code >> 6));
                        out += static_cast<char>(0x80 | (code & 0x3F));
                    } else {
                        out += static_cast<char>(0xE0 | (code >> 12));
                        out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
                        out += static_cast<char>(0x80 | (code & 0x3F));
                    }
                    break;
                }
                default: out += e;  // \" \\ \/
            }
        }
        if (pos_ >= text_.size()) fail("unfinished string");
        ++pos_;
        return out;
    }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

}  // namespace mini_json
