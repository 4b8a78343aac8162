// ts_model_runner: runs the model.pt of a ts-handlers archive with LibTorch, without Python.
//
//   ts_model_runner MODEL_PT INPUTS_FILE OUTPUTS_FILE
//
// It is the worked example of docs/without-python.md and the C++ half of the parity test
// integration_tests/test_libtorch.py. What it does, in order:
//
//   1. loads MODEL_PT (a frozen TorchScript module, as the archive build saves it) on the CPU;
//   2. reads our metadata, which the build stores inside model.pt as the _extra_files entry
//      "ts_handlers.json", and prints it on one stdout line "metadata: {...}";
//   3. reads the input tensors from INPUTS_FILE: a tuple or list of tensors that Python wrote
//      with torch.save (its default zip format), e.g. (input_ids, attention_mask);
//   4. calls forward(*inputs) once, under inference mode;
//   5. writes the output tensor(s) to OUTPUTS_FILE as a tuple that Python reads with torch.load.
//
// Why this file format: torch.save's zip archive is what torch::pickle_load reads and what
// torch::pickle_save writes, so neither side needs a third library (no numpy, no protobuf) and
// dtypes and shapes travel exactly. A C++ service would build its tensors in memory instead
// (torch::from_blob over its own buffers); the files exist so that Python can check the answers.
//
// stdout carries "key: value" lines, one per fact, so a script can read them; errors go to
// stderr with exit status 1 (2 for a wrong command line).

#include <torch/script.h>  // torch::jit::load, IValue; the TorchScript runtime only
#include <torch/serialize.h>  // torch::pickle_load / torch::pickle_save
#include <ATen/Parallel.h>  // at::get_num_threads, to report the intra-op threads used

#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// The name the Python export gives the metadata inside model.pt (ts_handlers/export.py
// METADATA_FILE). torch::jit::load fills in the value of every key present in this map.
const char* const kMetadataFile = "ts_handlers.json";

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot open " + path);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) {
    throw std::runtime_error("cannot write " + path);
  }
}

// "int64[3, 12]": enough for a reader to check dtype and shape at a glance.
std::string describe(const at::Tensor& tensor) {
  std::ostringstream text;
  text << c10::toString(tensor.scalar_type()) << tensor.sizes();
  return text.str();
}

// The inputs file holds what Python passed to torch.save: a tuple or a list of tensors (one
// bare tensor is accepted too). Anything else is refused with what was found, since a model
// called with the wrong arguments fails later with a much less helpful TorchScript message.
std::vector<c10::IValue> tensors_from(const c10::IValue& value) {
  std::vector<c10::IValue> inputs;
  if (value.isTensor()) {
    inputs.push_back(value);
  } else if (value.isTuple()) {
    for (const auto& element : value.toTupleRef().elements()) {
      inputs.push_back(element);
    }
  } else if (value.isList()) {
    for (const c10::IValue element : value.toListRef()) {
      inputs.push_back(element);
    }
  } else {
    throw std::runtime_error("the inputs file must hold a tuple or list of tensors, got " +
                             value.tagKind());
  }
  for (const auto& input : inputs) {
    if (!input.isTensor()) {
      throw std::runtime_error("every input must be a tensor, got " + input.tagKind());
    }
  }
  return inputs;
}

// Our models return one tensor; a tuple or list of tensors is passed through as well, so the
// runner also serves graphs that return several outputs.
std::vector<c10::IValue> outputs_of(const c10::IValue& value) {
  if (value.isTensor()) {
    return {value};
  }
  return tensors_from(value);
}

int run(const std::string& model_path, const std::string& inputs_path,
        const std::string& outputs_path) {
  // Inference mode (stronger than NoGradGuard): no autograd graph is recorded and tensors skip
  // version counting, as the Python handler's torch.inference_mode() does.
  c10::InferenceMode inference_mode;

  torch::jit::ExtraFilesMap extra_files{{kMetadataFile, ""}};
  torch::jit::Module module = torch::jit::load(model_path, torch::kCPU, extra_files);
  module.eval();  // frozen modules are already in eval mode; this keeps unfrozen ones honest
  const std::string& metadata = extra_files[kMetadataFile];
  if (metadata.empty()) {
    std::cerr << "warning: " << model_path << " has no " << kMetadataFile
              << " in its _extra_files (not built by ts-handlers?)\n";
  }
  // The build writes the metadata with json.dumps, which puts it on a single line.
  std::cout << "model: " << model_path << "\n";
  std::cout << "metadata: " << (metadata.empty() ? "{}" : metadata) << "\n";

  const std::vector<c10::IValue> inputs = tensors_from(torch::pickle_load(read_bytes(inputs_path)));
  for (const auto& input : inputs) {
    std::cout << "input: " << describe(input.toTensor()) << "\n";
  }

  const auto started = std::chrono::steady_clock::now();
  const c10::IValue result = module.forward(inputs);
  const auto elapsed = std::chrono::steady_clock::now() - started;

  // A tuple, not a list: torch::pickle_save writes a list through a TorchScript helper
  // (torch.jit._pickle.build_tensorlist for a List[Tensor], restore_type_tag for a generic
  // list) that torch.load's default weights_only unpickler refuses (checked with torch 2.13),
  // while a tuple of tensors is plain pickle.
  const std::vector<c10::IValue> outputs = outputs_of(result);
  for (const auto& output : outputs) {
    std::cout << "output: " << describe(output.toTensor()) << "\n";
  }
  write_bytes(outputs_path, torch::pickle_save(c10::ivalue::Tuple::create(outputs)));
  std::cout << "forward_ms: "
            << std::chrono::duration<double, std::milli>(elapsed).count() << "\n";
  std::cout << "threads: " << at::get_num_threads() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL_PT INPUTS_FILE OUTPUTS_FILE\n"
              << "  MODEL_PT      model.pt from a ts-handlers archive (unzip the .mar)\n"
              << "  INPUTS_FILE   a tuple or list of tensors written by Python's torch.save\n"
              << "  OUTPUTS_FILE  where the output tensors go, a tuple torch.load reads\n";
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3]);
  } catch (const std::exception& error) {
    // c10::Error (a bad model file, a shape the graph rejects) is a std::exception too; its
    // what() holds the TorchScript traceback, which is what someone debugging needs.
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
}
