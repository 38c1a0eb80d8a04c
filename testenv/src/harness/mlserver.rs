//! Models MLServer's scikit-learn runtime loads: trained here with the Python of MLServer's own
//! virtualenv (scripts/testenv-build.sh installs it), as a data scientist would push them.

use std::path::{Path, PathBuf};

/// The `python` of MLServer's virtualenv (it has scikit-learn and joblib).
pub fn mlserver_python(mlserver: &Path) -> PathBuf {
    mlserver.with_file_name("python")
}

/// `model-settings.json` of `model` at `version`: MLServer's scikit-learn runtime on `model.joblib`.
pub fn model_settings(model: &str, version: &str) -> Vec<u8> {
    let s = serde_json::json!({
        "name": model,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": version},
    });
    serde_json::to_vec_pretty(&s).expect("settings serialize")
}

/// A small logistic regression (`seed` varies the training data, so each version differs) and its
/// settings: the files of one version, `model.joblib` first.
pub fn trained_model(python: &Path, model: &str, version: &str, seed: u32) -> Vec<(&'static str, Vec<u8>)> {
    let script = format!(
        "import io, sys, joblib\n\
         from sklearn.linear_model import LogisticRegression\n\
         X = [[0, 0], [1, 1], [0, 1], [1, 0], [{seed}, 1]]\n\
         y = [0, 1, 1, 0, 1]\n\
         buf = io.BytesIO(); joblib.dump(LogisticRegression().fit(X, y), buf)\n\
         sys.stdout.buffer.write(buf.getvalue())\n"
    );
    let out = std::process::Command::new(python).args(["-c", &script]).output().expect("running MLServer's python");
    assert!(out.status.success(), "training a model: {}", String::from_utf8_lossy(&out.stderr));
    vec![("model.joblib", out.stdout), ("model-settings.json", model_settings(model, version))]
}

/// The body of an Open Inference Protocol request of one row of two features.
pub fn inference_request() -> String {
    serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]}).to_string()
}
