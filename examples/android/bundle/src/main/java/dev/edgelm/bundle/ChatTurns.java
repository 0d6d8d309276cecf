package dev.edgelm.bundle;

import com.google.gson.JsonObject;

/**
 * The model's chat template rendered by `edgelm export` into the strings around each turn
 * (edgelm/chat_turns.py), for runtimes that take raw text. The app sends only the new turn each
 * time; the runtime keeps the conversation in its cache.
 */
public final class ChatTurns {
    /** Why the template could not be cut into turns (then chat must be rendered whole), or null. */
    public final String unavailable;
    public final String firstUserPrefix;
    public final String userSuffix;
    public final String nextUserPrefix;
    public final String bosToken;

    private ChatTurns(String unavailable, String firstUserPrefix, String userSuffix, String nextUserPrefix, String bosToken) {
        this.unavailable = unavailable;
        this.firstUserPrefix = firstUserPrefix;
        this.userSuffix = userSuffix;
        this.nextUserPrefix = nextUserPrefix;
        this.bosToken = bosToken;
    }

    static ChatTurns parse(JsonObject chat) throws BundleException {
        if (chat == null) return new ChatTurns("the bundle has no chat turns (exported by an older edgelm)", "", "", "", "");
        if (chat.has("unavailable")) return new ChatTurns(Json.string(chat, "unavailable"), "", "", "", "");
        return new ChatTurns(null, Json.string(chat, "first_user_prefix"), Json.string(chat, "user_suffix"),
                Json.string(chat, "next_user_prefix"), Json.optionalString(chat, "bos_token", ""));
    }

    public boolean available() {
        return unavailable == null;
    }

    /**
     * The first turn's text. {@code bosAddedElsewhere}: the runtime or its tokenizer puts the BOS
     * token in front itself, so the template's own BOS text is dropped (else it would be there twice).
     */
    public String firstTurn(String user, boolean bosAddedElsewhere) {
        String prefix = firstUserPrefix;
        if (bosAddedElsewhere && !bosToken.isEmpty() && prefix.startsWith(bosToken)) prefix = prefix.substring(bosToken.length());
        return prefix + user + userSuffix;
    }

    /** A later turn's text, sent after the runtime stopped on the previous answer's stop token. */
    public String nextTurn(String user) {
        return nextUserPrefix + user + userSuffix;
    }
}
