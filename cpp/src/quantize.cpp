// The quantization maps and their search tables (quantize.hpp).  Compiled once, with the
// baseline flags: every ISA's driver reads the same tables.
#include "fastoptim/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

namespace fastoptim {

namespace {

// torch.linspace(start, end, steps, dtype=float32): a float32 step; the first half counted up
// from start, the second half down from end, each value rounded once from start + step * i.
std::vector<float> linspace_f32(float start, float end, int steps) {
  const float step = (end - start) / static_cast<float>(steps - 1);
  std::vector<float> out(static_cast<std::size_t>(steps));
  for (int i = 0; i < steps; ++i) {
    const double v = i < steps / 2
                         ? static_cast<double>(start) + static_cast<double>(step) * i
                         : static_cast<double>(end) - static_cast<double>(step) * (steps - i - 1);
    out[static_cast<std::size_t>(i)] = static_cast<float>(v);
  }
  return out;
}

// bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits), without its padding to
// 256 entries: for each exponent i, the means of linspace(0.1, 1, n_i) scaled by 10^(i - e + 1)
// (a float32 product), both signs when signed; then 0 and 1; sorted.
std::vector<float> dynamic_map(bool is_signed, int max_exponent_bits, int total_bits) {
  std::vector<float> data;
  const int non_sign = total_bits - 1;
  const int additional = (1 << (non_sign - max_exponent_bits)) - 1;
  auto add = [&](int items, int i) {
    const std::vector<float> b = linspace_f32(0.1f, 1.0f, items);
    const auto scale = static_cast<float>(std::pow(10.0, i - (max_exponent_bits - 1)));
    for (std::size_t k = 0; k + 1 < b.size(); ++k) {
      const float v = scale * ((b[k] + b[k + 1]) / 2.0f);
      data.push_back(v);
      if (is_signed) data.push_back(-v);
    }
  };
  for (int i = 0; i < max_exponent_bits; ++i)
    add(is_signed ? (1 << (i + non_sign - max_exponent_bits)) + 1
                  : (1 << (i + non_sign - max_exponent_bits + 1)) + 1,
        i);
  if (additional > 0) add(additional + 1, max_exponent_bits - 1);
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  return data;
}

// Decision thresholds between ascending values v (codes first_code + j): x > result[j] takes
// code first_code + j + 1 or above.  On the float32 midpoint itself the even code wins: up
// (x >= midpoint, i.e. x > the float below it) when code first_code + j + 1 is even.
std::vector<float> decision_thresholds(const std::vector<float>& v, int32_t first_code) {
  std::vector<float> t;
  for (std::size_t j = 0; j + 1 < v.size(); ++j) {
    const float m = (v[j] + v[j + 1]) * 0.5f;
    const bool up = (first_code + static_cast<int32_t>(j) + 1) % 2 == 0;
    t.push_back(up ? std::nextafter(m, -std::numeric_limits<float>::infinity()) : m);
  }
  return t;
}

// A map's non-negative values, ascending (codes pos_base + rank, rank = the number of
// thresholds t below |x|, as bit patterns); `mirrors` where the negative values are exactly
// their negations (codes pos_base - rank, at least 0: a signed map has no -1).
struct SplitMap {
  int32_t pos_base = 0;
  std::vector<float> pos;
  std::vector<uint32_t> t;
  bool mirrors = true;
};

SplitMap split_map(const std::vector<float>& map) {
  SplitMap s;
  const auto first = std::lower_bound(map.begin(), map.end(), 0.0f) - map.begin();
  s.pos_base = static_cast<int32_t>(first);
  s.pos.assign(map.begin() + first, map.end());
  for (int32_t r = 1; r <= s.pos_base; ++r)
    s.mirrors = s.mirrors && r < static_cast<int32_t>(s.pos.size()) &&
                map[static_cast<std::size_t>(s.pos_base - r)] == -s.pos[static_cast<std::size_t>(r)];
  for (const float tj : decision_thresholds(s.pos, s.pos_base)) s.t.push_back(bits_of(tj));
  return s;
}

// The proof of a search's candidate rank (candidate(a): the rank guessed for |x| = float_of(a)):
// within one below the true rank (the thresholds below |x|) and in [0, max_rank] for every
// |x| < 2.  It suffices to check 0, the largest |x| < 2, both sides of every threshold and of
// every region's first bit pattern (`starts`), and that the candidate does not decrease across
// those starts: inside a region it is a monotone line's floor.
template <class Candidate>
bool prove_candidate(const std::vector<uint32_t>& t, const std::vector<uint32_t>& starts,
                     int32_t max_rank, Candidate candidate) {
  const auto fits = [&](uint32_t a) {
    const int32_t c = candidate(a);
    const auto want = static_cast<int32_t>(std::lower_bound(t.begin(), t.end(), a) - t.begin());
    return c >= 0 && c <= max_rank && (want == c || want == c + 1);
  };
  bool ok = fits(0u) && fits(0x3FFFFFFFu);
  for (const uint32_t tj : t) ok = ok && fits(tj) && fits(tj + 1);
  for (const uint32_t b : starts)
    ok = ok && b > 0 && fits(b - 1) && fits(b) && candidate(b - 1) <= candidate(b);
  return ok;
}

// The gather-free search's tables (QTables::searchable): decades (P[d-1], P[d]] of the
// positive values, P[d] = float(10^(d - 7)), d = 1..7 (every 8-bit dynamic map).  `searchable`
// stays false unless prove_candidate holds: maps of another shape (the 4-bit ones' QTables)
// keep the bucket words.
void fill_search(QTables& q, const std::vector<float>& pos, const std::vector<uint32_t>& t,
                 int32_t pos_base) {
  q.pos_base = pos_base;
  for (int r = 0; r < 256; ++r) {
    const uint32_t thr = r < static_cast<int>(t.size()) ? t[static_cast<std::size_t>(r)]
                                                        : 0x7F800000u;
    for (int j = 0; j < 4; ++j) q.thr_bytes[j][r] = static_cast<uint8_t>(thr >> (8 * j));
  }
  constexpr int D = 7;
  float P[D + 1];
  for (int d = 0; d <= D; ++d) P[d] = static_cast<float>(std::pow(10.0, d - D));
  // regions: 0, |x| <= P[0]; r = 1..D, (P[r-1], P[r]]; D + 1, |x| > P[D] = 1
  q.region_a[D + 1] = 0.0f;
  q.region_c[D + 1] = static_cast<float>(t.size());
  for (int r = 1; r <= D; ++r) {
    const auto first = std::upper_bound(pos.begin(), pos.end(), P[r - 1]) - pos.begin();
    const auto end = std::lower_bound(pos.begin(), pos.end(), P[r]) - pos.begin();
    const double n = static_cast<double>(end - first);
    q.region_a[r] = static_cast<float>(n / (0.9 * P[r]));
    q.region_c[r] = static_cast<float>(static_cast<double>(first) - 0.5 - n / 9.0);
  }
  for (uint32_t k = 0; k < 32; ++k) {
    // (a quiet NaN: |x| > it never holds, and comparing with it raises no invalid-operation
    // flag, which a signaling NaN did, even in the quiet compares: a trapped FE_INVALID killed
    // the process at an 8-bit step)
    uint32_t first = 0, bound = 0x7FC00000u;
    if (k > 0) {  // (k = 0, below 2^-24: region 0)
      const float lower = std::ldexp(1.0f, static_cast<int>(k + kQRegionExp) - 127);
      for (int d = 0; d <= D; ++d) {
        if (P[d] < lower) first = static_cast<uint32_t>(d + 1);
        else if (P[d] < 2.0f * lower) bound = bits_of(P[d]);
      }
    }
    q.region_bound[k] = float_of((bound & ~15u) | first);
  }
  if (t.size() > 255) return;
  std::vector<uint32_t> starts;  // region k + 1 begins above region_bound[k]
  for (const float bound : q.region_bound)
    if (bits_of(bound) < 0x7F800000u) starts.push_back(bits_of(bound) + 1);
  q.searchable = prove_candidate(t, starts, 255, [&](uint32_t a) {
    return q_rank_candidate(float_of(a), q);
  });
}

// (On the heap: the bucket words are 128 KiB.)
std::unique_ptr<const QTables> build(const std::vector<float>& map) {
  auto q = std::make_unique<QTables>();
  q->ncodes = static_cast<int>(map.size());
  if (q->ncodes > 256) throw std::logic_error("quantization map too long");
  std::copy(map.begin(), map.end(), q->value);
  for (int c = 0; c < 256; ++c)
    for (int j = 0; j < 4; ++j)
      q->value_bytes[j][c] = static_cast<uint8_t>(bits_of(q->value[c]) >> (8 * j));
  const SplitMap sm = split_map(map);
  if (!sm.mirrors)
    throw std::logic_error("quantization map: negative values do not mirror the positive ones");
  const int32_t pos_base = sm.pos_base;
  const std::vector<uint32_t>& t = sm.t;
  const auto neg_code = [&](int32_t rank) { return std::max(pos_base - rank, int32_t{0}); };
  for (int32_t k = 0; k < kQBuckets; ++k) {
    const bool neg = k >= kQBuckets / 2;
    // |x|'s bit patterns in this bucket: [lo, lo + 2^16) (y = b for x >= 0, ~b for x < 0)
    const uint32_t lo = static_cast<uint32_t>(neg ? kQBuckets - 1 - k : k) << 16;
    int32_t below = 0, inside = 0;
    uint32_t thr = 0;
    for (const uint32_t tj : t) {
      if (tj < lo) ++below;
      else if (tj - lo < 0x10000u) { ++inside; thr = tj & 0xFFFFu; }
    }
    if (inside > 1) throw std::logic_error("quantization map: two thresholds in one bucket");
    if (thr == 0xFFFFu) inside = 0;  // (|x| > thr never holds inside the bucket)
    int32_t code = 0;
    uint32_t low = 0;
    if (!neg) {
      code = pos_base + below;
      if (inside) low = 0xFFFFu - thr;
    } else if (inside && neg_code(below) != neg_code(below + 1)) {
      code = neg_code(below + 1);
      low = thr + 1;
    } else {
      code = neg_code(below);
    }
    if (code + (low != 0 ? 1 : 0) > 255) throw std::logic_error("quantization map: code > 255");
    q->bucket[k] = (static_cast<uint32_t>(code) - static_cast<uint32_t>(k)) << 16 | low;
  }
  q->zero = q_code(0.0f, *q);
  fill_search(*q, sm.pos, t, pos_base);
  return q;
}

// The 4-bit maps (quantize.hpp): torchao's signed dynamic map and its unsigned linear one.
std::vector<float> map4(bool is_signed) {
  if (is_signed) return dynamic_map(true, 3, 4);
  std::vector<float> v = linspace_f32(0.0f, 1.0f, 17);
  v.erase(v.begin());  // no zero: a second moment never dequantizes to 0
  return v;
}

// The 4-bit search's tables (Q4Tables::searchable): thresholds on |x| between the non-negative
// values (a tie taking the even code, the same threshold for both signs), codes by rank and sign,
// and per binade a line whose floor is the candidate rank: a = 0, c = the rank at the binade's
// start where at most one threshold lies inside; otherwise a = (n - 1) / (last - first threshold
// inside) and c centring a * t_i - i (i = 1..n) in [R - 1, R) (R: the rank at the start).
// `searchable` stays false unless prove_candidate holds, and for maps whose negative values do not
// mirror the positive ones.
void fill_search4(Q4Tables& q, const std::vector<float>& map) {
  q.searchable = false;
  const SplitMap sm = split_map(map);
  if (!sm.mirrors) return;
  const int32_t pos_base = sm.pos_base;
  const std::vector<uint32_t>& t = sm.t;
  if (t.size() > 15) return;
  for (int r = 0; r < 16; ++r) {
    q.thr_rank[r] = r < static_cast<int>(t.size()) ? t[static_cast<std::size_t>(r)] : 0x7F800000u;
    q.code_of[r] = std::min(pos_base + r, 15);
    q.code_of[16 + r] = std::max(pos_base - r, int32_t{0});
  }
  const auto rank = [&](uint32_t a) {  // thresholds below |x| = float_of(a)
    return static_cast<int32_t>(std::lower_bound(t.begin(), t.end(), a) - t.begin());
  };
  const auto bin_lo = [](uint32_t k) { return k == 0 ? 0u : (k + kQ4BinExp) << 23; };
  for (uint32_t k = 0; k < 16; ++k) {
    const uint32_t lo = bin_lo(k), hi = k == 15 ? 0x40000000u : bin_lo(k + 1);
    std::vector<double> in;
    for (const uint32_t tj : t)
      if (tj >= lo && tj < hi) in.push_back(static_cast<double>(float_of(tj)));
    const double R = rank(lo);
    if (in.size() <= 1) {
      q.bin_a[k] = 0.0f;
      q.bin_c[k] = static_cast<float>(R);
      continue;
    }
    const double a = static_cast<double>(in.size() - 1) / (in.back() - in.front());
    double rmin = 1e300, rmax = -1e300;
    for (std::size_t i = 0; i < in.size(); ++i) {
      const double res = a * in[i] - static_cast<double>(i + 1);
      rmin = std::min(rmin, res);
      rmax = std::max(rmax, res);
    }
    q.bin_a[k] = static_cast<float>(a);
    q.bin_c[k] = static_cast<float>(R - 0.5 - (rmin + rmax) / 2.0);
  }
  std::vector<uint32_t> starts;
  for (uint32_t k = 1; k < 16; ++k) starts.push_back(bin_lo(k));
  q.searchable = std::all_of(q.bin_a, q.bin_a + 16, [](float a) { return a >= 0.0f; }) &&
                 prove_candidate(t, starts, 15, [&](uint32_t a) {
                   return q4_rank_candidate(float_of(a), q);
                 });
}

Q4Tables build4(const std::vector<float>& map) {
  if (map.size() != 16) throw std::logic_error("4-bit quantization map: need 16 values");
  Q4Tables q;
  std::copy(map.begin(), map.end(), q.value);
  for (std::size_t j = 0; j + 1 < map.size(); ++j)
    if (!(map[j] < map[j + 1])) throw std::logic_error("4-bit quantization map: not ascending");
  const std::vector<float> thr = decision_thresholds(map, 0);  // x > thr[j] counts
  std::copy(thr.begin(), thr.end(), q.thr);
  q.zero = static_cast<uint8_t>(q4_code(0.0f, q.thr));
  fill_search4(q, map);
  return q;
}

}  // namespace

const QTables& qtables(QMap m) {
  static const std::unique_ptr<const QTables> s8 = build(dynamic_map(true, 7, 8));
  static const std::unique_ptr<const QTables> u8 = build(dynamic_map(false, 7, 8));
  static const std::unique_ptr<const QTables> s4 = build(map4(true));
  static const std::unique_ptr<const QTables> u4 = build(map4(false));
  switch (m) {
    case QMap::signed8: return *s8;
    case QMap::unsigned8: return *u8;
    case QMap::signed4: return *s4;
    case QMap::unsigned4: return *u4;
  }
  throw std::invalid_argument("unknown quantization map");
}

const Q4Tables& q4tables(QMap m) {
  static const Q4Tables s4 = build4(map4(true));
  static const Q4Tables u4 = build4(map4(false));
  switch (m) {
    case QMap::signed4: return s4;
    case QMap::unsigned4: return u4;
    default: break;
  }
  throw std::invalid_argument("not a 4-bit quantization map");
}

// (convert.hpp) Stochastic rounding's key of one block: splitmix64 over (seed, step, tensor,
// array, the high 32 bits of the element index).
uint32_t random_key(uint64_t seed, int64_t step, uint64_t tensor, uint32_t array,
                    uint64_t index_high) {
  uint64_t k = splitmix64(seed);
  k = splitmix64(k ^ static_cast<uint64_t>(step));
  k = splitmix64(k ^ tensor);
  k = splitmix64(k ^ (static_cast<uint64_t>(array) << 32 | (index_high & 0xFFFFFFFFull)));
  return static_cast<uint32_t>(k >> 32);
}

}  // namespace fastoptim
