package dev.edgelm.bundle;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.EnumMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

public class ManifestTest {
    static String artifact(String name, String format, String path, long bytes, String runtime, String passed) {
        return artifact(name, format, path, bytes, runtime, passed, null, null, "passed");
    }

    /** An artifact entry with the export's vendor check (package, version, result), when package is not null. */
    static String artifact(String name, String format, String path, long bytes, String runtime, String passed,
                           String vendorPackage, String vendorVersion, String vendorResult) {
        String vendor = vendorPackage == null ? "" : ",\"vendor_runtimes\":[{\"runtime\":\"x\",\"package\":\"" + vendorPackage
                + "\",\"version\":\"" + vendorVersion + "\",\"result\":\"" + vendorResult + "\",\"files\":[]}]";
        return "{\"name\":\"" + name + "\",\"format\":\"" + format + "\",\"path\":\"" + path + "\",\"sha256\":\""
                + "0".repeat(64) + "\",\"bytes\":" + bytes + ",\"quant\":\"int4\",\"runtime\":\"" + runtime
                + "\",\"signature\":{\"max_context\":1024}" + (passed == null ? "" : ",\"parity\":{\"passed\":" + passed + "}")
                + ",\"profile\":{\"decode_tok_s\":12.5}" + vendor + "}";
    }

    static Map<VendorRuntime, Version> app(String executorch, String litert, String genai) {
        Map<VendorRuntime, Version> built = new EnumMap<>(VendorRuntime.class);
        try {
            if (executorch != null) built.put(VendorRuntime.EXECUTORCH, Version.parse(executorch));
            if (litert != null) built.put(VendorRuntime.LITERT_LM, Version.parse(litert));
            if (genai != null) built.put(VendorRuntime.ORT_GENAI, Version.parse(genai));
        } catch (BundleException e) {
            throw new AssertionError(e);
        }
        return built;
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

    static BundleManifest presetBundle() throws BundleException {
        return BundleManifest.parse(manifest(1,
                artifact("onnx-int8", "onnx", "onnx/int8/model_q8.onnx", 200, "onnxruntime", "true", "onnxruntime-genai", "0.18.0", "passed"),
                artifact("onnx-int4", "onnx", "onnx/int4/model_q4.onnx", 150, "onnxruntime", "true", "onnxruntime-genai", "0.18.0", "passed"),
                artifact("tflite-int8", "tflite", "tflite/model_int8.tflite", 140, "litert", "true", "litert-lm-api", "0.18.1", "passed"),
                artifact("executorch-int4", "executorch", "executorch/model_8da4w.pte", 130, "executorch", "true", "executorch", "1.5.1", "passed"),
                artifact("gguf-int4", "gguf", "gguf/model-Q4_1.gguf", 98, "llama.cpp", "true", "llama_cpp_python", "0.3.36", "passed"),
                artifact("reference-fp32", "safetensors", "reference/model.safetensors", 538, "torch", "true")));
    }

    static List<String> names(List<ArtifactChooser.Candidate> plan, boolean usable) {
        List<String> out = new ArrayList<>();
        for (ArtifactChooser.Candidate c : plan) if (c.usable() == usable) out.add(c.artifact.name);
        return out;
    }

    @Test
    public void choosesInTheStatedOrderAmongWhatTheAppWasBuiltWith() throws Exception {
        List<ArtifactChooser.Candidate> plan = ArtifactChooser.plan(presetBundle(), app("1.5.1", "0.18.1", "0.18.0"));
        // llama.cpp is not in this build; within ONNX the smaller file first
        assertEquals(Arrays.asList("executorch-int4", "tflite-int8", "onnx-int4", "onnx-int8"), names(plan, true));
        assertEquals(Arrays.asList("gguf-int4", "reference-fp32"), names(plan, false));
        assertTrue(plan.get(4).skipped.contains("built without llama.cpp"));
        assertTrue(plan.get(5).skipped.contains("no phone runtime reads safetensors"));
    }

    @Test
    public void versionRulesFollowTheVendorsCompatibility() throws Exception {
        assertTrue(Version.parse("1.5.1").runs(Version.parse("1.5.1")));
        assertTrue(Version.parse("1.6.0").runs(Version.parse("1.5.1")));  // a newer runtime reads older files
        assertFalse(Version.parse("1.4.1").runs(Version.parse("1.5.1")));  // no forward compatibility
        assertFalse(Version.parse("2.0.0").runs(Version.parse("1.5.1")));  // another major line
        assertFalse(Version.parse("0.19.0").runs(Version.parse("0.18.1")));  // 0.x: minors change formats
        assertTrue(Version.parse("0.18.2").runs(Version.parse("0.18.1")));
        assertEquals(Version.parse("2.13.0"), Version.parse("2.13.0+cpu"));
        assertThrows(BundleException.class, () -> Version.parse("latest"));
        // the app of the issue: ExecuTorch 0.7.0 against a .pte from 1.5.1 is skipped with the reason
        List<ArtifactChooser.Candidate> plan = ArtifactChooser.plan(presetBundle(), app("0.7.0", "0.18.1", "0.17.0"));
        assertEquals(Arrays.asList("tflite-int8"), names(plan, true));
        String why = plan.toString();
        assertTrue(why, plan.toString().contains("made for executorch 1.5.1; this app has 0.7.0 (older: update the app's org.pytorch:executorch-android)"));
        assertTrue(why, plan.toString().contains("made for onnxruntime-genai 0.18.0; this app has 0.17.0"));
    }

    @Test
    public void failedGatesAndFailedVendorChecksAreNotTried() throws Exception {
        BundleManifest m = BundleManifest.parse(manifest(1,
                artifact("executorch-int4", "executorch", "executorch/a.pte", 130, "executorch", "false", "executorch", "1.5.1", "passed"),
                artifact("tflite-int8", "tflite", "tflite/a.tflite", 140, "litert", "true", "litert-lm-api", "0.18.1", "mismatch: 12 of 64 tokens"),
                artifact("onnx-int4", "onnx", "onnx/a.onnx", 150, "onnxruntime", "true")));
        List<ArtifactChooser.Candidate> plan = ArtifactChooser.plan(m, app("1.5.1", "0.18.1", "0.18.0"));
        assertTrue(names(plan, true).isEmpty());
        assertTrue(plan.get(0).skipped.contains("failed its parity gate"));
        assertTrue(plan.get(1).skipped.contains("did not pass it at export: mismatch"));
        assertTrue(plan.get(2).skipped.contains("did not run it"));
        BundleException e = assertThrows(BundleException.class, () -> ArtifactChooser.loadFirst(plan, c -> "never"));
        assertTrue(e.getMessage().contains("no artifact of this bundle runs here"));
    }

    @Test
    public void aFailedLoadFallsBackToTheNextArtifactAndSaysWhy() throws Exception {
        List<ArtifactChooser.Candidate> plan = ArtifactChooser.plan(presetBundle(), app("1.5.1", "0.18.1", "0.18.0"));
        List<String> tried = new ArrayList<>();
        ArtifactChooser.Loaded<String> loaded = ArtifactChooser.loadFirst(plan, c -> {
            tried.add(c.artifact.name);
            if (c.runtime == VendorRuntime.EXECUTORCH) throw new UnsatisfiedLinkError("libexecutorch.so not found");
            if (c.runtime == VendorRuntime.LITERT_LM) throw new IllegalStateException("engine failed to initialize");
            return "session of " + c.artifact.name;
        });
        assertEquals(Arrays.asList("executorch-int4", "tflite-int8", "onnx-int4"), tried);
        assertEquals("session of onnx-int4", loaded.session);
        String notes = String.join("\n", loaded.notes);
        assertTrue(notes, notes.contains("executorch-int4: org.pytorch:executorch-android could not load it: java.lang.UnsatisfiedLinkError"));
        assertTrue(notes, notes.contains("tflite-int8: com.google.ai.edge.litertlm:litertlm-android could not load it"));
        assertTrue(notes, notes.contains("gguf-int4: this app was built without"));
        BundleException none = assertThrows(BundleException.class, () -> ArtifactChooser.loadFirst(plan, c -> {
            throw new RuntimeException("out of memory for " + c.artifact.name);
        }));
        assertTrue(none.getMessage().contains("onnx-int8: com.microsoft.onnxruntime:onnxruntime-genai-android could not load it"));
    }

    @Test
    public void wronglyTypedFieldsAreBundleExceptionsNotCrashes() {
        String good = manifest(1, artifact("onnx-int4", "onnx", "onnx/a.onnx", 10, "onnxruntime", "true", "onnxruntime-genai", "0.18.0", "passed"));
        String[][] breakages = {
                {"\"schema_version\":1", "\"schema_version\":\"one\""},
                {"\"schema_version\":1", "\"schema_version\":1.5"},
                {"\"bytes\":10", "\"bytes\":\"ten\""},
                {"\"max_context\":1024", "\"max_context\":[1]"},
                {"\"passed\":true", "\"passed\":\"yes\""},
                {"\"name\":\"onnx-int4\"", "\"name\":{\"a\":1}"},
                {"\"artifacts\":[", "\"artifacts\":[7,"},
                {"\"files\":[]", "\"files\":\"genai_config.json\""},
                {"\"version\":\"0.18.0\"", "\"version\":18"},
                {"\"temperature\":0.0", "\"temperature\":\"hot\""},
                {"\"chat_template\":true", "\"chat_template\":\"yes\""},
                {"\"source\":{\"model_id\":\"tiny\"}", "\"source\":[]"},
                {"\"tokenizer/tokenizer.json\":\"" + "1".repeat(64) + "\"", "\"tokenizer/tokenizer.json\":{}"},
        };
        for (String[] b : breakages) {
            assertTrue("not in the fixture: " + b[0], good.contains(b[0]));
            String broken = good.replace(b[0], b[1]);
            try {
                BundleManifest.parse(broken);
                throw new AssertionError("accepted " + b[1]);
            } catch (BundleException expected) {
                assertTrue(expected.getMessage(), expected.getMessage().startsWith("manifest.json"));
            }
        }
    }

    @Test
    public void chatTurnsPutTheTemplateAroundEachTurn() throws Exception {
        String chat = ",\"eos_token_ids\":[2],\"tokenizer_adds_bos_id\":null,\"chat\":{\"first_user_prefix\":\"<s>[SYS]<|user|>\","
                + "\"user_suffix\":\"<|end|><|assistant|>\",\"next_user_prefix\":\"<|end|><|user|>\",\"bos_token\":\"<s>\"}";
        BundleManifest m = BundleManifest.parse(manifest(1).replace("\"repetition_penalty\":1.0", "\"repetition_penalty\":1.0" + chat));
        assertTrue(m.chat.available());
        assertArrayEquals(new int[] {2}, m.eosTokenIds);
        assertNull(m.tokenizerAddsBosId);
        assertEquals("<s>[SYS]<|user|>hi<|end|><|assistant|>", m.chat.firstTurn("hi", false));
        assertEquals("[SYS]<|user|>hi<|end|><|assistant|>", m.chat.firstTurn("hi", true));  // the runtime adds BOS
        assertEquals("<|end|><|user|>more<|end|><|assistant|>", m.chat.nextTurn("more"));
        BundleManifest old = BundleManifest.parse(manifest(1));
        assertFalse(old.chat.available());
        assertTrue(old.chat.unavailable.contains("older edgelm"));
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
