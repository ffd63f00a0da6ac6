//! Renders a model's own chat template (`tokenizer.chat_template`) around a single user prompt.
//!
//! The template is Jinja, written for Hugging Face `transformers`; it is rendered with the same
//! whitespace rules transformers (and llama.cpp's `--jinja`) use, so the prompt the model sees is
//! the one it was trained on.

use minijinja::{Environment, Error, ErrorKind, Value, context, syntax::SyntaxConfig};

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl From<Error> for TemplateError {
    fn from(e: Error) -> Self {
        Self(e.to_string())
    }
}

/// A chat template plus the special-token texts it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Checks the template by rendering a sample prompt, so that a broken template fails the
    /// load rather than every job.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, TemplateError> {
        let t = Self {
            source,
            bos_token,
            eos_token,
        };
        t.render_user("Hello")?;
        Ok(t)
    }

    /// The prompt text for one user message, ending where the assistant's answer begins.
    pub fn render_user(&self, prompt: &str) -> Result<String, TemplateError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks on.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        // Templates call this to reject conversations they cannot format (e.g. bad role order).
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        let messages = Value::from(vec![context! { role => "user", content => prompt }]);
        let out = env.render_str(
            &self.source,
            context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, verbatim from its GGUF metadata.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_renders_chatml() {
        let t = ChatTemplate::new(SMOLLM2.into(), "<|im_start|>".into(), "<|im_end|>".into())
            .expect("valid template");
        assert_eq!(
            t.render_user("What is 2+2?").expect("renders"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trim_blocks_applies_like_transformers() {
        let src = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).expect("valid");
        assert_eq!(t.render_user("x").expect("renders"), "  x\n");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        assert!(
            ChatTemplate::new(
                "{{ raise_exception('no') }}".into(),
                String::new(),
                String::new()
            )
            .is_err()
        );
        assert!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()).is_err());
    }
}
