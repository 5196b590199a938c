// torch's CPU generator (a Mersenne twister, MT19937) run on a copy of its state: the 64-bit draws
// that torch.multinomial's exponential loop makes, one per entry of the probabilities, of which
// generation.multinomial_draw needs the low 53 bits at a few entries and whether any entry drew 0.
// torch makes them one call at a time (21 ms for 16 x 256384 entries); here the state's words are
// regenerated block by block, and only the asked-for entries are tempered and stored.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace umt5_fast {
namespace {

constexpr int kWords = 624, kShift = 397;  // MT19937's N and M
constexpr uint32_t kMatrix = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;

// torch.Generator.get_state()'s bytes (CPUGeneratorImplState): the seed (8), `left` (int32 at 8),
// `seeded` (int32 at 12), `next` (uint64 at 16), the 624 words (each a uint64 from 24), then the
// normal-sample caches (untouched here). multinomial_draw checks this layout against torch's draws
// before it relies on it.
constexpr int64_t kStateBytes = 5056, kLeftAt = 8, kNextAt = 16, kWordsAt = 24;

// MT19937's output of a word: an invertible map of 32-bit words with temper(0) == 0, so an output
// is 0 exactly where its word is.
inline uint32_t temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((v & 1u) ? kMatrix : 0u);
}

struct Twister {
  uint32_t words[kWords];
  int64_t left, next;  // torch's: the next output is words[next] once --left leaves it above 0

  // All words regenerated, in MT19937's order (each block of the first two loops reads words not
  // yet overwritten, or overwritten 227 / 397 words earlier: vectorisable).
  void regenerate() {
    int i = 0;
    for (; i < kWords - kShift; ++i) words[i] = words[i + kShift] ^ twist(words[i], words[i + 1]);
    for (; i < kWords - 1; ++i) words[i] = words[i + kShift - kWords] ^ twist(words[i], words[i + 1]);
    words[kWords - 1] = words[kShift - 1] ^ twist(words[kWords - 1], words[0]);
  }

  // The words behind the next `count` outputs into out, untempered (torch's operator() tempers
  // each: temper() below), as `count` calls would take them.
  void fill(uint32_t* out, int64_t count) {
    while (count > 0) {
      if (left == 1) {  // the call that finds --left == 0 regenerates, then reads words[0]
        regenerate();
        left = kWords + 1;
        next = 0;
      }
      const int64_t take = std::min<int64_t>(count, left - 1);
      std::memcpy(out, words + next, take * sizeof(uint32_t));
      out += take;
      count -= take;
      next += take;
      left -= take;
    }
  }
};

}  // namespace

void register_mt19937(py::module_& m) {
  m.def("mt19937_low53_draws",
        [](uintptr_t state, int64_t entries, uintptr_t positions, int64_t count, uintptr_t out) {
          auto* bytes = reinterpret_cast<uint8_t*>(state);
          int32_t left32;
          uint64_t next64;
          std::memcpy(&left32, bytes + kLeftAt, 4);
          std::memcpy(&next64, bytes + kNextAt, 8);
          if (left32 < 1 || left32 > kWords + 1 || next64 > static_cast<uint64_t>(kWords) || entries < 0)
            throw std::invalid_argument("mt19937_low53_draws: not a CPU generator state");
          Twister twister;
          twister.left = left32;
          twister.next = static_cast<int64_t>(next64);
          for (int i = 0; i < kWords; ++i) {
            uint64_t word;
            std::memcpy(&word, bytes + kWordsAt + 8 * i, 8);
            twister.words[i] = static_cast<uint32_t>(word);
          }
          const auto* wanted = reinterpret_cast<const int64_t*>(positions);
          for (int64_t k = 0; k < count; ++k)
            if (wanted[k] < 0 || wanted[k] >= entries || (k > 0 && wanted[k] <= wanted[k - 1]))
              throw std::invalid_argument("mt19937_low53_draws: positions must ascend within [0, entries)");
          auto* low53 = reinterpret_cast<int64_t*>(out);
          bool drew_zero = false;
          {
            py::gil_scoped_release no_gil;
            constexpr int64_t kBlock = 4096;  // entries a pass: two outputs each
            std::vector<uint32_t> words(2 * kBlock);
            int64_t k = 0;
            for (int64_t begin = 0; begin < entries; begin += kBlock) {
              const int64_t n = std::min(kBlock, entries - begin);
              twister.fill(words.data(), 2 * n);
              // an entry's draw is (high << 32 | low); its low 53 bits are 0 (q = 0) only where the low
              // output, and so its word, is 0: the high output is tempered there alone
              uint32_t zero_low = 0;
              for (int64_t e = 0; e < n; ++e) zero_low |= static_cast<uint32_t>(words[2 * e + 1] == 0);
              for (int64_t e = 0; zero_low && e < n; ++e)
                drew_zero = drew_zero || (words[2 * e + 1] == 0 && (temper(words[2 * e]) & 0x1fffffu) == 0);
              for (; k < count && wanted[k] < begin + n; ++k) {
                const int64_t e = wanted[k] - begin;
                low53[k] = static_cast<int64_t>((static_cast<uint64_t>(temper(words[2 * e]) & 0x1fffffu) << 32) |
                                                temper(words[2 * e + 1]));
              }
            }
          }
          const int32_t left_after = static_cast<int32_t>(twister.left);
          const uint64_t next_after = static_cast<uint64_t>(twister.next);
          std::memcpy(bytes + kLeftAt, &left_after, 4);
          std::memcpy(bytes + kNextAt, &next_after, 8);
          for (int i = 0; i < kWords; ++i) {
            const uint64_t word = twister.words[i];
            std::memcpy(bytes + kWordsAt + 8 * i, &word, 8);
          }
          return drew_zero;
        },
        py::kw_only(), py::arg("state"), py::arg("entries"), py::arg("positions"), py::arg("count"),
        py::arg("out"),
        "Advances a torch CPU generator state (get_state()'s 5056 bytes, in place) by `entries` 64-bit "
        "draws, as `entries` calls of random64() would, and writes the low 53 bits of the draws at the "
        "ascending `positions` (int64 [count]) to out (int64 [count]); returns whether any draw's low "
        "53 bits were 0.");
}

}  // namespace umt5_fast
