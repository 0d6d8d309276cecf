package dev.edgelm.bundle;

/** A bundle the app cannot use: missing or malformed manifest, a file that fails its hash, nothing runnable. */
public class BundleException extends Exception {
    private static final long serialVersionUID = 1L;

    public BundleException(String message) {
        super(message);
    }

    public BundleException(String message, Throwable cause) {
        super(message, cause);
    }
}
