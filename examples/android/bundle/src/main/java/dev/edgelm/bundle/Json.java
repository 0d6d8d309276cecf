package dev.edgelm.bundle;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;

import java.util.ArrayList;
import java.util.List;

/**
 * Typed reads of manifest.json. Every wrong type or missing field is a BundleException naming
 * the field, never gson's unchecked IllegalStateException / NumberFormatException: a manifest
 * from another edgelm version must produce a message on screen, not a crash.
 */
final class Json {
    private Json() {
    }

    static JsonObject object(JsonElement element, String where) throws BundleException {
        if (element == null || !element.isJsonObject()) throw new BundleException("manifest.json: " + where + " must be an object");
        return element.getAsJsonObject();
    }

    static JsonObject object(JsonObject parent, String key) throws BundleException {
        return object(parent.get(key), "'" + key + "'");
    }

    static JsonObject optionalObject(JsonObject parent, String key) throws BundleException {
        return isMissing(parent, key) ? null : object(parent, key);
    }

    static JsonArray array(JsonObject parent, String key) throws BundleException {
        JsonElement e = parent.get(key);
        if (e == null || !e.isJsonArray()) throw new BundleException("manifest.json: '" + key + "' must be a list");
        return e.getAsJsonArray();
    }

    static String string(JsonObject parent, String key) throws BundleException {
        JsonPrimitive p = primitive(parent, key);
        if (p == null || !p.isString()) throw new BundleException("manifest.json: '" + key + "' must be a string");
        return p.getAsString();
    }

    static String optionalString(JsonObject parent, String key, String fallback) throws BundleException {
        return isMissing(parent, key) ? fallback : string(parent, key);
    }

    static double number(JsonObject parent, String key, double fallback) throws BundleException {
        if (isMissing(parent, key)) return fallback;
        JsonPrimitive p = primitive(parent, key);
        if (p == null || !p.isNumber()) throw new BundleException("manifest.json: '" + key + "' must be a number");
        return p.getAsDouble();
    }

    static int integer(JsonObject parent, String key) throws BundleException {
        JsonPrimitive p = primitive(parent, key);
        if (p == null || !p.isNumber()) throw new BundleException("manifest.json: '" + key + "' must be a whole number");
        double value = p.getAsDouble();
        if (value != Math.rint(value) || Math.abs(value) > Integer.MAX_VALUE) {
            throw new BundleException("manifest.json: '" + key + "' must be a whole number, not " + p);
        }
        return (int) value;
    }

    static Integer optionalInteger(JsonObject parent, String key) throws BundleException {
        return isMissing(parent, key) ? null : integer(parent, key);
    }

    static Boolean optionalBoolean(JsonObject parent, String key) throws BundleException {
        if (isMissing(parent, key)) return null;
        JsonPrimitive p = primitive(parent, key);
        if (p == null || !p.isBoolean()) throw new BundleException("manifest.json: '" + key + "' must be true or false");
        return p.getAsBoolean();
    }

    static List<String> strings(JsonObject parent, String key) throws BundleException {
        List<String> out = new ArrayList<>();
        if (isMissing(parent, key)) return out;
        for (JsonElement e : array(parent, key)) {
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
                throw new BundleException("manifest.json: '" + key + "' must be a list of strings");
            }
            out.add(e.getAsString());
        }
        return out;
    }

    static int[] integers(JsonObject parent, String key) throws BundleException {
        if (isMissing(parent, key)) return new int[0];
        JsonArray values = array(parent, key);
        int[] out = new int[values.size()];
        for (int i = 0; i < out.length; i++) {
            JsonElement e = values.get(i);
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber() || e.getAsDouble() != Math.rint(e.getAsDouble())) {
                throw new BundleException("manifest.json: '" + key + "' must be a list of whole numbers");
            }
            out[i] = e.getAsInt();
        }
        return out;
    }

    private static boolean isMissing(JsonObject parent, String key) {
        return !parent.has(key) || parent.get(key).isJsonNull();
    }

    private static JsonPrimitive primitive(JsonObject parent, String key) throws BundleException {
        if (!parent.has(key)) throw new BundleException("manifest.json: missing '" + key + "'");
        JsonElement e = parent.get(key);
        return e.isJsonPrimitive() ? e.getAsJsonPrimitive() : null;
    }
}
