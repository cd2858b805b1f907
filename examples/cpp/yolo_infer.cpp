// yolo_infer: run the exported backbone.pt + postprocess.pt on one image with LibTorch alone (no Python)
// and print the JSON body the TorchServe handler returns (handler/response.py).
//
//   yolo_infer BACKBONE.pt POSTPROCESS.pt IMAGE.ppm [--conf 0.25] [--iou 0.7] [--max-det 300] [--precise]
//              [--threads N] [--letterbox-only OUT.ppm]
//
// IMAGE.ppm: binary PPM (P6, maxval 255), RGB, the decoded original image.
// --precise prints boxes, scores and keypoints with full float precision instead of the handler's
// 2 / 4 decimals (used by tests/test_cpp.py to compare with the Python pipeline at 1e-4).
// --letterbox-only writes the letterboxed network input as a PPM and exits (the test compares it with
// handler/letterbox.py pixel for pixel).
//
// Letterbox: the same placement as handler/letterbox.py (rect or square, Ultralytics' +-0.1 padding
// split, pad value 114), and a resize that reproduces OpenCV's cv2.INTER_LINEAR on uint8 bit for bit:
// 11-bit fixed-point coefficients, a horizontal pass in int32, and the vertical pass with OpenCV's
// SIMD rounding ((b0 * (r0 >> 4) >> 16) + (b1 * (r1 >> 4) >> 16) + 2) >> 2; an exact 2x downscale is
// OpenCV's INTER_AREA (2x2 mean, +2 >> 2), which cv2.resize switches to by itself.

#include <ATen/Parallel.h>
#include <torch/script.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------- metadata.json (a minimal JSON reader)

struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  const Json& at(const std::string& key) const {
    auto it = object.find(key);
    if (kind != Kind::Object || it == object.end()) throw std::runtime_error("metadata has no key '" + key + "'");
    return it->second;
  }
  bool has(const std::string& key) const { return kind == Kind::Object && object.count(key) && !object.at(key).is_null(); }
  bool is_null() const { return kind == Kind::Null; }
  int64_t as_int() const { return static_cast<int64_t>(number); }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value();
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("metadata.json: " + what + " at offset " + std::to_string(i_));
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool consume(const std::string& word) {
    if (s_.compare(i_, word.size(), word) != 0) return false;
    i_ += word.size();
    return true;
  }
  Json value() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Json::Kind::Object;
      ++i_;
      skip_ws();
      if (s_[i_] == '}') return ++i_, v;
      while (true) {
        skip_ws();
        std::string key = string_literal();
        skip_ws();
        if (s_[i_++] != ':') fail("expected ':'");
        v.object[key] = value();
        skip_ws();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_++] != '}') fail("expected '}'");
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Kind::Array;
      ++i_;
      skip_ws();
      if (s_[i_] == ']') return ++i_, v;
      while (true) {
        v.array.push_back(value());
        skip_ws();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_++] != ']') fail("expected ']'");
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::Kind::String;
      v.string = string_literal();
      return v;
    }
    if (consume("null")) return v;
    if (consume("true")) { v.kind = Json::Kind::Bool; v.boolean = true; return v; }
    if (consume("false")) { v.kind = Json::Kind::Bool; return v; }
    char* end = nullptr;
    v.number = std::strtod(s_.c_str() + i_, &end);
    if (end == s_.c_str() + i_) fail("unexpected character");
    v.kind = Json::Kind::Number;
    i_ = end - s_.c_str();
    return v;
  }
  std::string string_literal() {
    if (s_[i_++] != '"') fail("expected a string");
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {  // BMP code point -> UTF-8 (class names are ASCII in practice)
          unsigned cp = std::stoul(s_.substr(i_, 4), nullptr, 16);
          i_ += 4;
          if (cp < 0x80) out += static_cast<char>(cp);
          else if (cp < 0x800) { out += static_cast<char>(0xC0 | (cp >> 6)); out += static_cast<char>(0x80 | (cp & 0x3F)); }
          else { out += static_cast<char>(0xE0 | (cp >> 12)); out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)); out += static_cast<char>(0x80 | (cp & 0x3F)); }
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
    ++i_;
    return out;
  }
};

// ---------------------------------------------------------------- image input

// Binary PPM (P6, maxval 255) -> uint8[H, W, 3], RGB.
torch::Tensor read_ppm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  auto token = [&f]() {
    std::string t;
    while (t.empty()) {
      int c = f.get();
      if (c == EOF) throw std::runtime_error("truncated PPM header");
      if (c == '#') { std::string line; std::getline(f, line); continue; }
      if (std::isspace(c)) continue;
      t += static_cast<char>(c);
      while (!std::isspace(f.peek()) && f.peek() != EOF) t += static_cast<char>(f.get());
    }
    return t;
  };
  if (token() != "P6") throw std::runtime_error(path + " is not a binary PPM (P6)");
  int64_t w = std::stoll(token()), h = std::stoll(token()), maxval = std::stoll(token());
  if (maxval != 255 || w < 1 || h < 1) throw std::runtime_error("PPM must be 8-bit (maxval 255) and at least 1x1");
  f.get();  // the single whitespace after maxval
  auto image = torch::empty({h, w, 3}, torch::kUInt8);
  f.read(reinterpret_cast<char*>(image.data_ptr<uint8_t>()), h * w * 3);
  if (f.gcount() != h * w * 3) throw std::runtime_error("truncated PPM pixel data");
  return image;
}

void write_ppm(const std::string& path, const torch::Tensor& image) {  // image: uint8[H, W, 3]
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << image.size(1) << " " << image.size(0) << "\n255\n";
  auto c = image.contiguous();
  f.write(reinterpret_cast<const char*>(c.data_ptr<uint8_t>()), c.numel());
  if (!f) throw std::runtime_error("cannot write " + path);
}

// ---------------------------------------------------------------- letterbox (handler/letterbox.py)

constexpr int64_t kPadValue = 114;
constexpr int64_t kCoefScale = 2048;  // OpenCV INTER_RESIZE_COEF_SCALE (11 bits)

struct LetterboxParams {
  int64_t orig_h, orig_w, resized_h, resized_w, pad_top, pad_left, input_h, input_w;

  // The postprocessor's geometry row: [pad_left, pad_top, gain_x, gain_y, orig_w, orig_h].
  std::array<float, 6> row() const {
    return {static_cast<float>(pad_left), static_cast<float>(pad_top),
            static_cast<float>(static_cast<double>(resized_w) / orig_w),
            static_cast<float>(static_cast<double>(resized_h) / orig_h), static_cast<float>(orig_w),
            static_cast<float>(orig_h)};
  }
};

// Python's round(): to nearest, ties to even (the default FP rounding mode).
int64_t round_half_even(double v) { return static_cast<int64_t>(std::nearbyint(v)); }

int64_t py_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

LetterboxParams letterbox_params(int64_t h0, int64_t w0, int64_t th, int64_t tw, int64_t stride, bool rect) {
  double r = std::min(static_cast<double>(th) / h0, static_cast<double>(tw) / w0);
  int64_t new_w = std::max<int64_t>(round_half_even(w0 * r), 1), new_h = std::max<int64_t>(round_half_even(h0 * r), 1);
  int64_t dw = tw - new_w, dh = th - new_h;
  if (rect) dw = py_mod(dw, stride), dh = py_mod(dh, stride);
  int64_t top = round_half_even(dh / 2.0 - 0.1), bottom = round_half_even(dh / 2.0 + 0.1);
  int64_t left = round_half_even(dw / 2.0 - 0.1), right = round_half_even(dw / 2.0 + 0.1);
  return {h0, w0, new_h, new_w, top, left, new_h + top + bottom, new_w + left + right};
}

// OpenCV's source index and fixed-point weights for one axis: dst pixel d reads src (i0, i1) with
// weights (c0, c1), c0 + c1 == 2048. fx is computed in double, stored as float, as cv::resize does.
// Outside the image cv::resize moves a column tap onto the edge pixel with weights (2048, 0)
// (edge_weights), but only clamps the row index and keeps the row weights.
struct AxisTaps {
  torch::Tensor i0, i1, c0, c1;  // int64[dst]
};

AxisTaps axis_taps(int64_t src, int64_t dst, bool edge_weights) {
  double scale = 1.0 / (static_cast<double>(dst) / src);  // cv::resize: scale_x = 1. / inv_scale_x
  auto d = torch::arange(dst, torch::kFloat64);
  auto f = ((d + 0.5) * scale - 0.5).to(torch::kFloat32);
  auto s = f.floor();
  f = f - s;
  auto si = s.to(torch::kInt64);
  auto below = si < 0, above = si >= src - 1;  // border taps: weight (1, 0) on the edge pixel
  if (edge_weights) f = f.masked_fill(below.logical_or(above), 0.0f);
  auto next = (si + 1).clamp(0, src - 1);  // from the unclamped index: row -1 reads rows (0, 0)
  si = si.clamp(0, src - 1);
  auto c0 = ((1.0f - f) * static_cast<float>(kCoefScale)).round().to(torch::kInt64);  // lrint: ties to even
  auto c1 = (f * static_cast<float>(kCoefScale)).round().to(torch::kInt64);
  return {si, next, c0, c1};
}

// x >> bits on int64 values (all non-negative here)
torch::Tensor shr(const torch::Tensor& x, int64_t bits) { return torch::bitwise_right_shift(x, bits); }

// cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) for image: uint8[H, W, C].
torch::Tensor resize_linear(const torch::Tensor& image, int64_t h, int64_t w) {
  int64_t src_h = image.size(0), src_w = image.size(1), c = image.size(2);
  auto x = image.to(torch::kInt64);
  if (src_w == 2 * w && src_h == 2 * h) {  // cv::resize turns an exact 2x linear downscale into INTER_AREA
    auto sum = x.view({h, 2, w, 2, c}).sum({1, 3});
    return shr(sum + 2, 2).to(torch::kUInt8);
  }
  AxisTaps tx = axis_taps(src_w, w, true), ty = axis_taps(src_h, h, false);
  // horizontal pass: [H, w, C], values scaled by 2048
  auto rows = x.index_select(1, tx.i0) * tx.c0.view({1, w, 1}) + x.index_select(1, tx.i1) * tx.c1.view({1, w, 1});
  // vertical pass with OpenCV's SIMD rounding (VResizeLinearVec_32s8u)
  auto r0 = shr(rows.index_select(0, ty.i0), 4), r1 = shr(rows.index_select(0, ty.i1), 4);  // [h, w, C]
  auto out = shr(shr(r0 * ty.c0.view({h, 1, 1}), 16) + shr(r1 * ty.c1.view({h, 1, 1}), 16) + 2, 2);
  return out.clamp(0, 255).to(torch::kUInt8);
}

// image: uint8[H, W, 3] -> (uint8[input_h, input_w, 3], params)
torch::Tensor letterbox(const torch::Tensor& image, const LetterboxParams& p) {
  auto resized = (p.resized_h == image.size(0) && p.resized_w == image.size(1))
                     ? image
                     : resize_linear(image, p.resized_h, p.resized_w);
  auto padded = torch::full({p.input_h, p.input_w, 3}, kPadValue, torch::kUInt8);
  padded.narrow(0, p.pad_top, p.resized_h).narrow(1, p.pad_left, p.resized_w).copy_(resized);
  return padded;
}

// ---------------------------------------------------------------- JSON output (handler/response.py)

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (static_cast<unsigned char>(c) < 0x20) { char buf[8]; std::snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
    else out += c;
  }
  return out + "\"";
}

// round(v, decimals) as the handler does, or full float precision with --precise
std::string number(double v, int decimals, bool precise) {
  char buf[64];
  if (precise) std::snprintf(buf, sizeof buf, "%.9g", v);
  else std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

struct Options {
  std::string backbone, postprocess, image, letterbox_only;
  double conf = 0.25, iou = 0.7;
  int64_t max_det = 300;
  bool precise = false;
  int threads = 0;  // 0: libtorch's default
};

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--conf") o.conf = std::stod(next());
    else if (a == "--iou") o.iou = std::stod(next());
    else if (a == "--max-det") o.max_det = std::stoll(next());
    else if (a == "--precise") o.precise = true;
    else if (a == "--threads") o.threads = std::stoi(next());
    else if (a == "--letterbox-only") o.letterbox_only = next();
    else if (a.rfind("--", 0) == 0) throw std::invalid_argument("unknown option " + a);
    else positional.push_back(a);
  }
  if (positional.size() != 3) throw std::invalid_argument("expected BACKBONE.pt POSTPROCESS.pt IMAGE.ppm");
  if (!(o.conf >= 0 && o.conf <= 1) || !(o.iou >= 0 && o.iou <= 1) || o.max_det < 1 || o.max_det > 10000)
    throw std::invalid_argument("conf and iou must be in 0..1, max-det in 1..10000");
  o.backbone = positional[0], o.postprocess = positional[1], o.image = positional[2];
  return o;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "usage: yolo_infer BACKBONE.pt POSTPROCESS.pt IMAGE.ppm [--conf C] [--iou I] [--max-det N] [--precise] "
                 "[--threads N] [--letterbox-only OUT.ppm]\n"
              << "error: " << e.what() << "\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    if (opt.threads > 0) at::set_num_threads(opt.threads);
    torch::jit::ExtraFilesMap extra{{"metadata.json", ""}};
    auto postprocess = torch::jit::load(opt.postprocess, torch::kCPU, extra);
    if (extra["metadata.json"].empty()) throw std::runtime_error(opt.postprocess + " has no embedded metadata.json");
    const Json meta = JsonReader(extra["metadata.json"]).parse();
    if (meta.has("format") && meta.at("format").string != "torchscript")
      std::cerr << "note: metadata names format '" << meta.at("format").string << "'; this program runs the TorchScript "
                << "backbone.pt that the export writes beside it\n";
    const auto& imgsz = meta.at("imgsz").array;  // [h, w]
    const int64_t stride = meta.at("max_stride").as_int();
    const bool rect = meta.at("letterbox").string == "rect";
    const int64_t nkpt = meta.has("kpt_shape") ? meta.at("kpt_shape").array.at(0).as_int() : 0;
    const auto& names = meta.at("names").array;

    auto t0 = std::chrono::steady_clock::now();
    auto image = read_ppm(opt.image);  // uint8[H, W, 3] RGB
    auto p = letterbox_params(image.size(0), image.size(1), imgsz.at(0).as_int(), imgsz.at(1).as_int(), stride, rect);
    auto padded = letterbox(image, p);  // uint8[input_h, input_w, 3]
    if (!opt.letterbox_only.empty()) return write_ppm(opt.letterbox_only, padded), 0;
    // [1, 3, H, W] in channels-last memory, 0..1: the layout (and so the convolution kernels, whose sums
    // round differently) of handler/pipeline.py's to_input
    auto input = torch::empty({1, 3, p.input_h, p.input_w}, torch::TensorOptions().dtype(torch::kFloat32).memory_format(torch::MemoryFormat::ChannelsLast));
    input.copy_(padded.permute({2, 0, 1}).unsqueeze(0)).div_(255);
    if (std::getenv("YOLO_INFER_DEBUG")) std::cerr << "input strides " << input.strides() << "\n";
    double t_pre = ms_since(t0);

    auto backbone = torch::jit::load(opt.backbone, torch::kCPU);
    backbone.eval();
    postprocess.eval();
    t0 = std::chrono::steady_clock::now();
    auto out = backbone.forward({input}).toTuple();
    c10::List<torch::Tensor> feats;
    for (const auto& level : out->elements()) feats.push_back(level.toTensor());  // [1, no, H/s, W/s]
    double t_inf = ms_since(t0);

    t0 = std::chrono::steady_clock::now();
    auto row = p.row();
    auto geometry = torch::from_blob(row.data(), {1, 6}, torch::kFloat32).clone();
    auto conf = torch::full({1}, opt.conf, torch::kFloat32), iou = torch::full({1}, opt.iou, torch::kFloat32);
    auto max_det = torch::full({1}, opt.max_det, torch::kInt64);
    auto result = postprocess.forward({feats, geometry, conf, iou, max_det}).toTuple();
    auto dets = result->elements()[0].toTensor();  // float32[1, K, 6 + 3 * nkpt]
    int64_t count = result->elements()[1].toTensor()[0].item<int64_t>();
    double t_post = ms_since(t0);

    auto rows = dets[0].narrow(0, 0, count).to(torch::kFloat64).contiguous();
    auto r = rows.accessor<double, 2>();
    std::ostringstream js;
    js << "{\"model\": " << json_string(meta.at("name").string)
       << ", \"model_version\": " << json_string(meta.at("model_version").string)
       << ", \"task\": " << json_string(meta.at("task").string)
       << ", \"image\": {\"width\": " << p.orig_w << ", \"height\": " << p.orig_h << "}, \"detections\": [";
    for (int64_t i = 0; i < count; ++i) {
      auto class_id = static_cast<int64_t>(r[i][5]);
      js << (i ? ", " : "") << "{\"box\": [";
      for (int k = 0; k < 4; ++k) js << (k ? ", " : "") << number(r[i][k], 2, opt.precise);
      js << "], \"score\": " << number(r[i][4], 4, opt.precise) << ", \"class_id\": " << class_id
         << ", \"class_name\": " << json_string(names.at(class_id).string);
      if (nkpt) {
        js << ", \"keypoints\": [";
        for (int64_t k = 0; k < nkpt; ++k)
          js << (k ? ", " : "") << "[" << number(r[i][6 + 3 * k], 2, opt.precise) << ", "
             << number(r[i][7 + 3 * k], 2, opt.precise) << ", " << number(r[i][8 + 3 * k], 4, opt.precise) << "]";
        js << "]";
      }
      js << "}";
    }
    js << "], \"speed_ms\": {\"preprocess\": " << number(t_pre, 2, false) << ", \"inference\": " << number(t_inf, 2, false)
       << ", \"postprocess\": " << number(t_post, 2, false) << "}}";
    std::cout << js.str() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
