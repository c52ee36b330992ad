// The Python module of the native CPU kernels: the elastic linear (elastic_layer.h), the ISA switch
// (isa.h) and the fused layer ops (fused_ops_torch.h). Bindings only; no kernel code lives here.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "decoder_layer.h"
#include "elastic_layer.h"
#include "fused_ops_torch.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    using quept::Layer;
    m.doc() = "quept native CPU kernels for the elastic linear";
    py::class_<Layer>(m, "Layer")
        .def(py::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                      const torch::Tensor&, const torch::Tensor&, std::vector<int64_t>, std::vector<int64_t>, int64_t>(),
             py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"),
             py::arg("widths"), py::arg("ranks"), py::arg("group_size"))
        .def("forward", &Layer::forward, py::arg("x"), py::arg("bits"), py::arg("out") = py::none(),
             py::call_guard<py::gil_scoped_release>())
        .def("forward_segments", &Layer::forward_segments, py::arg("x"), py::arg("segments"), py::arg("out") = py::none(),
             py::call_guard<py::gil_scoped_release>())
        .def("resident_bytes", &Layer::resident_bytes)
        .def("planes", &Layer::planes);
    py::class_<quept::Segments>(m, "Segments")
        .def(py::init<const torch::Tensor&, std::vector<int64_t>, std::vector<int64_t>>(), py::arg("order"),
             py::arg("bits"), py::arg("bounds"), "rows order[bounds[i]:bounds[i+1]] run at bits[i] (order: int32 [M])")
        .def_property_readonly("num_rows", &quept::Segments::num_rows);
    m.def("isa_names", &quept::isa_names, "every ISA path of the table, slowest first");
    m.def("available_isas", &quept::available_isas, "ISA paths this CPU can run, slowest first");
    m.def("set_isa", &quept::set_isa, py::arg("name"), "Select the ISA path (one of isa_names())");
    m.def("current_isa", &quept::current_isa);
    m.def("set_w8_refine", &quept::set_w8_refine, py::arg("on"),
          "Width-8 rows take two-term (about 15-bit) activations (default on); off: one int8 term like every width");
    m.def("w8_refine", &quept::w8_refine);
    m.def("quantize_activations", &quept::quantize_activations, py::arg("x"),
          "(xq, dx, xqsum, xq2, dx2, xqsum2): the int8 activations, their chunk sums and the residual term, "
          "as this ISA path computes them");
    m.def("add_rms_norm", &quept::add_rms_norm, py::arg("h"), py::arg("delta"), py::arg("weight"), py::arg("eps"),
          "h += delta (in place, when given); returns rms_norm(h) * weight");
    m.def("rope_", &quept::rope_, py::arg("x"), py::arg("cos"), py::arg("sin"), "rotary embedding in place (rotate-half)");
    m.def("silu_mul", &quept::silu_mul, py::arg("gate"), py::arg("up"));
    m.def("paged_attention", &quept::paged_attention, py::arg("q"), py::arg("k_flat"), py::arg("v_flat"),
          py::arg("slots"), py::arg("starts"), py::arg("ends"), py::arg("scale"),
          "query rows over the paged cache, row r over the cache rows slots[starts[r]:ends[r]], read in place",
          py::call_guard<py::gil_scoped_release>());
    m.def(
        "decoder_layer",
        [](at::Tensor h, const std::optional<at::Tensor>& delta, const std::vector<const Layer*>& linears,
           const py::sequence& widths, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, const at::Tensor& cos,
           const at::Tensor& sin, at::Tensor k_flat, at::Tensor v_flat, const at::Tensor& write_slots,
           const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& ends, int64_t n_heads,
           int64_t n_kv_heads, int64_t head_dim, double eps, double scale) {
            std::vector<quept::LinearWidth> w;
            for (const auto& item : widths) {  // an int (every row at that width) or a Segments
                if (py::isinstance<py::int_>(item)) {
                    w.push_back({item.cast<int64_t>(), nullptr});
                } else {
                    w.push_back({0, item.cast<const quept::Segments*>()});
                }
            }
            py::gil_scoped_release release;
            return quept::decoder_layer(h, delta, linears, w, attn_norm, mlp_norm, cos, sin, k_flat, v_flat,
                                        write_slots, slots, starts, ends, {n_heads, n_kv_heads, head_dim, eps, scale});
        },
        py::arg("h"), py::arg("delta"), py::arg("linears"), py::arg("widths"), py::arg("attn_norm"),
        py::arg("mlp_norm"), py::arg("cos"), py::arg("sin"), py::arg("k_flat"), py::arg("v_flat"),
        py::arg("write_slots"), py::arg("slots"), py::arg("starts"), py::arg("ends"), py::arg("n_heads"),
        py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"),
        "one decoder layer (decoder_layer.h): h += delta in place, attention and MLP; returns the MLP output");
    m.def("write_kv", &quept::write_kv, py::arg("k_flat"), py::arg("v_flat"), py::arg("slots"), py::arg("k"),
          py::arg("v"), "K/V rows into the cache slots, converted to the cache's type");
}
