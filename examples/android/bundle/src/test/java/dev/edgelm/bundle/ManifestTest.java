package dev.edgelm.bundle;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;

import org.junit.Test;

public class ManifestTest {
    static String artifact(String name, String format, String path, long bytes, String runtime, String passed) {
        return "{\"name\":\"" + name + "\",\"format\":\"" + format + "\",\"path\":\"" + path + "\",\"sha256\":\""
                + "0".repeat(64) + "\",\"bytes\":" + bytes + ",\"quant\":\"int4\",\"runtime\":\"" + runtime
                + "\",\"signature\":{\"max_context\":1024}" + (passed == null ? "" : ",\"parity\":{\"passed\":" + passed + "}")
                + ",\"profile\":{\"decode_tok_s\":12.5}}";
    }

    static String manifest(int version, String... artifacts) {
        StringBuilder files = new StringBuilder("\"tokenizer/tokenizer.json\":\"" + "1".repeat(64) + "\"");
        for (String a : artifacts) {
            String path = a.replaceAll(".*\"path\":\"([^\"]+)\".*", "$1");
            files.append(",\"").append(path).append("\":\"").append("0".repeat(64)).append("\"");
        }
        return "{\"schema_version\":" + version + ",\"edgelm_version\":\"0.1.0\",\"target\":\"android\","
                + "\"source\":{\"model_id\":\"tiny\"},\"tokenizer\":{\"path\":\"tokenizer\",\"chat_template\":true},"
                + "\"generation\":{\"temperature\":0.0,\"max_new_tokens\":64,\"repetition_penalty\":1.0},"
                + "\"artifacts\":[" + String.join(",", artifacts) + "],\"files\":{" + files + "}}";
    }

    @Test
    public void parsesWhatTheAppNeeds() throws Exception {
        BundleManifest m = BundleManifest.parse(manifest(1, artifact("onnx-int4", "onnx", "onnx/model_q4.onnx", 10, "onnxruntime", "true")));
        assertEquals("tiny", m.modelId);
        assertEquals("android", m.target);
        assertTrue(m.hasChatTemplate);
        assertTrue(m.sampling.greedy());
        assertEquals(64, m.sampling.maxNewTokens);
        Artifact a = m.artifacts.get(0);
        assertEquals(1024, a.maxContext);
        assertEquals(Boolean.TRUE, a.parityPassed);
        assertEquals(12.5, a.decodeTokPerS, 1e-9);
    }

    @Test
    public void refusesOtherSchemaVersionsMissingFieldsAndBrokenJson() {
        assertThrows(BundleException.class, () -> BundleManifest.parse(manifest(2)));
        assertThrows(BundleException.class, () -> BundleManifest.parse("{\"schema_version\":1}"));
        assertThrows(BundleException.class, () -> BundleManifest.parse("{not json"));
        String orphan = manifest(1).replace("\"artifacts\":[]", "\"artifacts\":[" + artifact("x", "onnx", "onnx/x.onnx", 1, "onnxruntime", null) + "]");
        BundleException e = assertThrows(BundleException.class, () -> BundleManifest.parse(orphan));
        assertTrue(e.getMessage().contains("not in its files list"));
    }

    @Test
    public void choosesInTheStatedOrderSkippingMissingRuntimesAndFailedGates() throws Exception {
        BundleManifest m = BundleManifest.parse(manifest(1,
                artifact("onnx-int8", "onnx", "onnx/model_q8.onnx", 200, "onnxruntime", "true"),
                artifact("onnx-int4", "onnx", "onnx/model_q4.onnx", 150, "onnxruntime", "true"),
                artifact("tflite-int8", "tflite", "tflite/model_int8.tflite", 140, "litert", "true"),
                artifact("executorch-int4", "executorch", "executorch/model_8da4w.pte", 130, "executorch", "false"),
                artifact("gguf-int4", "gguf", "gguf/model-Q4_K_M.gguf", 105, "llama.cpp", "true")));
        List<String> all = Arrays.asList("llama.cpp", "executorch", "litert", "onnxruntime");
        assertEquals("gguf-int4", ArtifactChooser.choose(m, new HashSet<>(all)).name);
        // no llama.cpp in this build: ExecuTorch failed its gate, so LiteRT, then ONNX smallest first
        List<Artifact> order = ArtifactChooser.candidates(m, new HashSet<>(all.subList(1, 4)));
        assertEquals("tflite-int8", order.get(0).name);
        assertEquals("onnx-int4", order.get(1).name);
        assertEquals("onnx-int8", order.get(2).name);
        assertThrows(BundleException.class, () -> ArtifactChooser.choose(m, new HashSet<>(Arrays.asList("coreml"))));
    }

    @Test
    public void samplingSettingsAreValidated() {
        assertThrows(IllegalArgumentException.class, () -> new SamplingSettings(-1, 10, 1, 1, 0));
        assertThrows(IllegalArgumentException.class, () -> new SamplingSettings(0.7, 0, 1, 1, 0));
        assertThrows(IllegalArgumentException.class, () -> new SamplingSettings(0.7, 10, 1, 1.5, 0));
        assertFalse(new SamplingSettings(0.7, 10, 1.1, 0.9, 40).greedy());
    }

    @Test
    public void integrityCheckCatchesAModifiedFile() throws Exception {
        Path bundle = Files.createTempDirectory("bundle");
        Files.createDirectories(bundle.resolve("tokenizer"));
        Files.createDirectories(bundle.resolve("onnx"));
        Files.write(bundle.resolve("tokenizer/tokenizer.json"), "{}".getBytes(StandardCharsets.UTF_8));
        Files.write(bundle.resolve("onnx/model.onnx"), "weights".getBytes(StandardCharsets.UTF_8));
        String json = manifest(1, artifact("onnx-fp32", "onnx", "onnx/model.onnx", 7, "onnxruntime", "true"))
                .replace("1".repeat(64), IntegrityCheck.sha256(bundle.resolve("tokenizer/tokenizer.json")))
                .replace("\"onnx/model.onnx\":\"" + "0".repeat(64), "\"onnx/model.onnx\":\"" + IntegrityCheck.sha256(bundle.resolve("onnx/model.onnx")));
        Files.write(bundle.resolve("manifest.json"), json.getBytes(StandardCharsets.UTF_8));
        BundleManifest m = BundleManifest.read(bundle);
        IntegrityCheck.verify(bundle, m, m.artifacts.get(0));
        Files.write(bundle.resolve("onnx/model.onnx"), "tampered".getBytes(StandardCharsets.UTF_8));
        BundleException e = assertThrows(BundleException.class, () -> IntegrityCheck.verify(bundle, m, m.artifacts.get(0)));
        assertTrue(e.getMessage().contains("onnx/model.onnx does not match its sha256"));
        assertNull(BundleManifest.parse(manifest(1, artifact("a", "onnx", "onnx/a.onnx", 1, "onnxruntime", null))).artifacts.get(0).parityPassed);
    }
}
