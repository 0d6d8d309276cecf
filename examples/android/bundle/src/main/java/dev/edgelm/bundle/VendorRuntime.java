package dev.edgelm.bundle;

/**
 * The vendors' LLM runtimes an Android app can run a bundle's artifacts with, one row per
 * format: the Python package whose version the export's vendor check recorded (the same
 * release line as the Android library), the Android library, and which file it loads.
 * The app carries no tokenizer, sampler or KV cache of its own: each of these runtimes has them.
 */
public enum VendorRuntime {
    /** ExecuTorch's LlmModule: the .pte (with the LLM runner's methods) and tokenizer/tokenizer.json. */
    EXECUTORCH("executorch", "executorch", "org.pytorch:executorch-android"),
    /** LiteRT-LM's Engine: the .litertlm the export packed beside the .tflite. */
    LITERT_LM("tflite", "litert-lm-api", "com.google.ai.edge.litertlm:litertlm-android"),
    /** ONNX Runtime GenAI's Model: the artifact's folder with genai_config.json and the tokenizer. */
    ORT_GENAI("onnx", "onnxruntime-genai", "com.microsoft.onnxruntime:onnxruntime-genai-android"),
    /** llama.cpp: the .gguf, through a JNI bridge built from llama.cpp's sources (no Maven package). */
    LLAMA_CPP("gguf", "llama_cpp_python", "llama.cpp (an Android NDK build of its sources)");

    public final String format;
    /** The package the export's vendor check ran, as recorded in manifest.json. */
    public final String checkedPackage;
    public final String androidLibrary;

    VendorRuntime(String format, String checkedPackage, String androidLibrary) {
        this.format = format;
        this.checkedPackage = checkedPackage;
        this.androidLibrary = androidLibrary;
    }

    /** The runtime for a format, or null (the bundle's fp32 reference has none on a phone). */
    public static VendorRuntime forFormat(String format) {
        for (VendorRuntime r : values()) {
            if (r.format.equals(format)) return r;
        }
        return null;
    }
}
