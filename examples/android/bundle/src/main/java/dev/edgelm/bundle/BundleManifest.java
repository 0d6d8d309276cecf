package dev.edgelm.bundle;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;

import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * manifest.json of a bundle written by `edgelm export` (schema version 1): the source model,
 * tokenizer location, generation defaults, artifacts, and the sha256 of every file.
 * Parsing is strict about what the app relies on, so a change to the bundle format that would
 * break the app fails here (and in the contract test) rather than on a phone.
 */
public final class BundleManifest {
    public static final int SCHEMA_VERSION = 1;

    public final String modelId;
    public final String target;
    public final String tokenizerPath;
    public final boolean hasChatTemplate;
    public final SamplingSettings sampling;
    public final List<Artifact> artifacts;
    /** Relative path (POSIX) to sha256, for every file of the bundle but manifest.json. */
    public final Map<String, String> files;

    private BundleManifest(String modelId, String target, String tokenizerPath, boolean hasChatTemplate,
                           SamplingSettings sampling, List<Artifact> artifacts, Map<String, String> files) {
        this.modelId = modelId;
        this.target = target;
        this.tokenizerPath = tokenizerPath;
        this.hasChatTemplate = hasChatTemplate;
        this.sampling = sampling;
        this.artifacts = Collections.unmodifiableList(artifacts);
        this.files = Collections.unmodifiableMap(files);
    }

    public static BundleManifest read(Path bundle) throws BundleException {
        Path path = bundle.resolve("manifest.json");
        if (!Files.isRegularFile(path)) {
            throw new BundleException(bundle + ": no manifest.json; push a bundle made by `edgelm export`");
        }
        try (Reader reader = Files.newBufferedReader(path, StandardCharsets.UTF_8)) {
            return parse(JsonParser.parseReader(reader));
        } catch (IOException | JsonParseException | IllegalStateException e) {
            throw new BundleException(path + ": not valid JSON (" + e.getMessage() + "); re-push the bundle", e);
        }
    }

    public static BundleManifest parse(String json) throws BundleException {
        try {
            return parse(JsonParser.parseString(json));
        } catch (JsonParseException e) {
            throw new BundleException("manifest.json is not valid JSON: " + e.getMessage(), e);
        }
    }

    private static BundleManifest parse(JsonElement root) throws BundleException {
        if (!root.isJsonObject()) throw new BundleException("manifest.json: expected a JSON object");
        JsonObject m = root.getAsJsonObject();
        int version = integer(m, "schema_version");
        if (version != SCHEMA_VERSION) {
            throw new BundleException("manifest.json has schema version " + version + "; this app reads version "
                    + SCHEMA_VERSION + " — update the app or re-export with a matching edgelm");
        }
        JsonObject source = object(m, "source");
        JsonObject tokenizer = object(m, "tokenizer");
        JsonObject generation = object(m, "generation");
        SamplingSettings sampling;
        try {
            sampling = new SamplingSettings(
                    number(generation, "temperature", 0.0), (int) number(generation, "max_new_tokens", 256),
                    number(generation, "repetition_penalty", 1.0), number(generation, "top_p", 1.0),
                    (int) number(generation, "top_k", 0));
        } catch (IllegalArgumentException e) {
            throw new BundleException("manifest.json generation defaults: " + e.getMessage(), e);
        }
        List<Artifact> artifacts = new ArrayList<>();
        if (!m.has("artifacts") || !m.get("artifacts").isJsonArray()) throw new BundleException("manifest.json: no artifacts list");
        for (JsonElement element : m.getAsJsonArray("artifacts")) {
            JsonObject a = element.getAsJsonObject();
            JsonObject signature = a.has("signature") && a.get("signature").isJsonObject() ? a.getAsJsonObject("signature") : new JsonObject();
            JsonObject parity = a.has("parity") && a.get("parity").isJsonObject() ? a.getAsJsonObject("parity") : null;
            JsonObject profile = a.has("profile") && a.get("profile").isJsonObject() ? a.getAsJsonObject("profile") : null;
            artifacts.add(new Artifact(
                    string(a, "name"), string(a, "format"), string(a, "path"), string(a, "sha256"),
                    (long) number(a, "bytes", -1), string(a, "quant"), string(a, "runtime"),
                    (int) number(signature, "max_context", 0),
                    parity == null || !parity.has("passed") ? null : parity.get("passed").getAsBoolean(),
                    profile == null ? 0.0 : number(profile, "decode_tok_s", 0.0)));
        }
        Map<String, String> files = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> entry : object(m, "files").entrySet()) {
            files.put(entry.getKey(), entry.getValue().getAsString());
        }
        for (Artifact a : artifacts) {
            if (!files.containsKey(a.path)) {
                throw new BundleException("manifest.json: artifact " + a.name + " (" + a.path + ") is not in its files list");
            }
        }
        return new BundleManifest(string(source, "model_id"), string(m, "target"), string(tokenizer, "path"),
                tokenizer.has("chat_template") && tokenizer.get("chat_template").getAsBoolean(), sampling, artifacts, files);
    }

    private static JsonObject object(JsonObject parent, String key) throws BundleException {
        if (!parent.has(key) || !parent.get(key).isJsonObject()) throw new BundleException("manifest.json: missing object '" + key + "'");
        return parent.getAsJsonObject(key);
    }

    private static String string(JsonObject parent, String key) throws BundleException {
        if (!parent.has(key) || !parent.get(key).isJsonPrimitive()) throw new BundleException("manifest.json: missing '" + key + "'");
        return parent.get(key).getAsString();
    }

    private static int integer(JsonObject parent, String key) throws BundleException {
        if (!parent.has(key) || !parent.get(key).isJsonPrimitive()) throw new BundleException("manifest.json: missing '" + key + "'");
        return parent.get(key).getAsInt();
    }

    private static double number(JsonObject parent, String key, double fallback) {
        return parent.has(key) && parent.get(key).isJsonPrimitive() ? parent.get(key).getAsDouble() : fallback;
    }
}
